//! Where Dataverse, fno and plain OData v4 services differ, in one place.
use crate::domain::job::Flavor;

/// How a create-only write is made exclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreateBy {
    /// Dataverse: an upsert by alternate key with `If-None-Match: *` (an existing record
    /// answers 412 instead of being updated).
    UpsertIfNoneMatch,
    /// fno and plain OData: a POST to the entity set; an existing key answers a duplicate.
    Post,
}

pub fn create_by(flavor: Flavor) -> CreateBy {
    match flavor {
        Flavor::Dataverse => CreateBy::UpsertIfNoneMatch,
        Flavor::Fno | Flavor::Generic => CreateBy::Post,
    }
}

/// Query options every request to the service carries: fno data entities show the records of
/// the user's default company only, unless asked `cross-company=true` (the integration key
/// holds `dataAreaId`, which picks the company).
pub fn common_query(flavor: Flavor) -> Option<&'static str> {
    match flavor {
        Flavor::Fno => Some("cross-company=true"),
        Flavor::Dataverse | Flavor::Generic => None,
    }
}

/// Whether a write's answer should carry only the key fields (`$select` on a write with
/// `Prefer: return=representation`): Dataverse documents it; other services may refuse query
/// options on a write, so they return the whole entity.
pub fn select_on_write(flavor: Flavor) -> bool {
    flavor == Flavor::Dataverse
}

/// Whether a record whose key a URL cannot carry can be written through its id (Dataverse
/// record ids are GUIDs in `@odata.id`); fno has no such second address.
pub fn writes_by_id(flavor: Flavor) -> bool {
    flavor == Flavor::Dataverse
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flavors() {
        assert_eq!(create_by(Flavor::Dataverse), CreateBy::UpsertIfNoneMatch);
        assert_eq!(create_by(Flavor::Fno), CreateBy::Post);
        assert_eq!(common_query(Flavor::Fno), Some("cross-company=true"));
        assert_eq!(common_query(Flavor::Generic), None);
    }
}
