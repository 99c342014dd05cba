//! Server-driven paging: the service cuts a collection into pages and says where the next one
//! is (`@odata.nextLink`, relative or absolute); the client asks a page size with
//! `Prefer: odata.maxpagesize` and never builds `$skip` itself (the next link is the cursor).
use reqwest::Url;

/// The Prefer header value asking pages of `n` records.
pub fn max_page_size(n: usize) -> String {
    format!("odata.maxpagesize={}", n.max(1))
}

/// The absolute URL of a next link, resolved against the service root. A link to another
/// origin is refused: the connector's credentials go to its own service only.
pub fn resolve(root: &Url, link: &str) -> Result<Url, String> {
    let url = root.join(link).map_err(|e| format!("unreadable next link: {e}"))?;
    if url.origin() != root.origin() {
        return Err(format!("the next link points to another host ({}); not followed", url.host_str().unwrap_or("?")));
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_links_resolve_relative_and_absolute_on_the_same_origin_only() {
        let root = Url::parse("https://org.crm.dynamics.com/api/data/v9.2/").unwrap();
        let rel = resolve(&root, "accounts?$select=name&$skiptoken=%3Ccookie%20page%3D%222%22%3E").unwrap();
        assert_eq!(
            rel.as_str(),
            "https://org.crm.dynamics.com/api/data/v9.2/accounts?$select=name&$skiptoken=%3Ccookie%20page%3D%222%22%3E"
        );
        let abs = "https://org.crm.dynamics.com/api/data/v9.2/accounts?$skiptoken=x";
        assert_eq!(resolve(&root, abs).unwrap().as_str(), abs);
        assert!(resolve(&root, "https://evil.example/accounts").is_err());
        assert_eq!(max_page_size(500), "odata.maxpagesize=500");
    }
}
