//! The model test's harness (DESIGN §3's invariant), shared by `invariant.rs` (two sqlite apps)
//! and `invariant_odata.rs` (two OData services): the records and their history, the actions
//! proptest draws (users' edits and deletes, the pipeline's steps, crashes at failpoints,
//! duplicates, clock moves, faults), a harness that drives the real steps one at a time from one
//! thread, and the invariant checked after a drain. What differs between the apps (how a user
//! writes, how a change reaches capture, what a fault is) is behind [`Apps`].
#![allow(dead_code)] // each model test uses its own part of this

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use dualsync::adapters::embedded::EmbeddedDb;
use dualsync::domain::canon;
use dualsync::domain::change::Key;
use dualsync::domain::config::JobDef;
use dualsync::domain::errors::{ConflictRecord, ErrorStatus, SyncError};
use dualsync::domain::job::{JobStatus, Side};
use dualsync::domain::requests::RequestAction;
use dualsync::ports::{ManualClock, OutMessage, Queue};
use dualsync::runtime::local::{AppRegistry, LocalRuntime, BATCH};
use dualsync::runtime::verify;
use dualsync::runtime::worker::{run_once, settle};
use dualsync::state::ErrorFilter;
use dualsync::steps::{Failpoints, LoadedJob, StepError, StepKind};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::TestCaseError;
use serde_json::json;

use odata_sample::Fault;

use crate::common::{Control, Hook, Writes};

// ---------------------------------------------------------------------------------------------
// Configuration

/// Parents `p0..p2`, children `1..=2` of each: few, so that edits and deliveries meet often.
pub const PARENTS: u8 = 3;
pub const CHILDREN: u8 = 2;

/// A transaction over the queue limit ([`Action::BigEdit`]): a parent and this many children,
/// under a transaction id this long. Every change reference carries its transaction id, so the
/// transaction's captured form, and its lane once sequenced, take more than one queue message
/// (`MAX_MESSAGE_BYTES`, 240 KiB): capture keeps it in pieces and sequence reads it back whole,
/// then splits the lane across messages of its FIFO group. The id stays within what capture's
/// dedupe item can hold (a 2,048-byte partition key).
pub const BIG_CHILDREN: u8 = 130;
pub const BIG_TXID_BYTES: usize = 1900;

/// Queues give a message back after 30 s; moving the clock this far makes it visible again.
pub const PAST_VISIBILITY_MS: i64 = 31_000;

/// A message received 5 times goes to the dead-letter queue. At most 4 crashes between two
/// drains, each only while every message of its queue has been received fewer than 4 times
/// (system failures, such as an app's time-out, count receives too), keep every message out of
/// it: further crash actions run their step without crashing.
pub const MAX_CRASHES: usize = 4;

pub const DRAIN_ROUNDS: usize = 200;

pub const STEPS: [StepKind; 4] = [StepKind::Capture, StepKind::Sequence, StepKind::Deliver, StepKind::Reconcile];

pub fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

/// The maps of both model tests' job (A's entities are `invariant.rs`'s tables): parents and
/// their children, keyed by the parent's key and a number, with a lookup of the parent.
pub const MAPS: &str = "table_groups:
  - name: g
    maps:
      - name: parents
        sequence: 1
        entities: { a: parents, b: owners }
        keys: [{ a: pid, b: owner_id }]
        fields:
          - { a: name, b: title }
          - { a: n, b: num }
      - name: children
        sequence: 2
        entities: { a: children, b: items }
        keys: [{ a: pid, b: owner_id }, { a: cno, b: item_no }]
        fields: [{ a: label, b: caption }]
        lookups:
          - map: parents
            fields: [{ a: pid, b: owner_id }]
";

pub fn app_name(side: Side) -> &'static str {
    match side {
        Side::A => "a",
        Side::B => "b",
    }
}

// ---------------------------------------------------------------------------------------------
// Records and actions

/// A record of either map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Rec {
    Parent(u8),
    /// Parent, child number (1-based).
    Child(u8, u8),
}

impl Rec {
    pub fn pid(self) -> String {
        match self {
            Rec::Parent(p) | Rec::Child(p, _) => format!("p{p}"),
        }
    }
    pub fn map(self) -> &'static str {
        match self {
            Rec::Parent(_) => "parents",
            Rec::Child(..) => "children",
        }
    }
    pub fn map_idx(self) -> usize {
        match self {
            Rec::Parent(_) => 0,
            Rec::Child(..) => 1,
        }
    }
    pub fn key(self) -> Key {
        match self {
            Rec::Parent(_) => Key(vec![self.pid()]),
            Rec::Child(_, c) => Key(vec![self.pid(), c.to_string()]),
        }
    }
    /// The content written with value `v`, as side A's fields (what `canon` reads).
    pub fn fields_a(self, v: u64) -> canon::Fields {
        let fields = match self {
            Rec::Parent(_) => json!({ "pid": self.pid(), "name": format!("n{v}"), "n": v }),
            Rec::Child(_, c) => json!({ "pid": self.pid(), "cno": c, "label": format!("l{v}") }),
        };
        serde_json::from_value(fields).expect("fields")
    }
}

pub fn all_recs() -> impl Iterator<Item = Rec> {
    (0..PARENTS).flat_map(|p| std::iter::once(Rec::Parent(p)).chain((1..=CHILDREN).map(move |c| Rec::Child(p, c))))
}

/// Every failpoint of the steps and the step it is in.
pub const POINTS: [(&str, StepKind); 8] = [
    ("capture.delete_marked", StepKind::Capture),
    ("capture.after_send", StepKind::Capture),
    ("sequence.after_send", StepKind::Sequence),
    ("deliver.after_read", StepKind::Deliver),
    ("deliver.after_mark", StepKind::Deliver),
    ("deliver.after_write", StepKind::Deliver),
    ("deliver.after_commit", StepKind::Deliver),
    ("deliver.before_ack", StepKind::Deliver),
];

#[derive(Clone)]
pub enum Action {
    /// One app transaction upserting these records with fresh values; a child only where its
    /// parent exists on that side (skipped otherwise).
    Edit { side: Side, recs: Vec<Rec> },
    /// Move up to `limit` change-log rows of each app onto the capture queue.
    Feeds { limit: usize },
    /// Run one step once on a batch of up to `batch` messages.
    Step { step: StepKind, batch: usize },
    /// Arm a failpoint (index into [`POINTS`]), run its step (it stops there, acknowledging
    /// nothing), then move the clock past the visibility timeout so that the batch comes back.
    Crash { point: usize, batch: usize },
    /// Send a copy of one of the queue's messages (a FIFO copy gets a new deduplication id).
    Duplicate { step: StepKind, pick: Index },
    /// Move the clock.
    Advance { ms: i64 },
    /// One app transaction over the queue limit: the parent and children `1..=BIG_CHILDREN`
    /// of it, with fresh values, under a long transaction id (see [`BIG_CHILDREN`]).
    BigEdit { side: Side, parent: u8 },
    /// One app transaction deleting the record (a parent with its children).
    Delete { side: Side, rec: Rec },
    /// From now on, side's app writes like this.
    Fault { side: Side, writes: Writes },
    /// Arms a user's edit (or delete) of `rec` on `side`, made just before the next write to
    /// `target`: between a delivery's read and its write.
    DuringWrite { target: Side, side: Side, rec: Rec, delete: bool },
    /// The operator stops, starts, pauses or resumes the job (ignored where not allowed).
    Lifecycle(Op),
    /// The operator retries every open error.
    Retry,
    /// Two deliver workers on the same messages: the first receives up to `batch` of them, the
    /// visibility timeout passes and the second receives them again (a redelivery, with what
    /// follows in their groups, racing the delivery still under way, as when an invocation
    /// outlives the timeout). Both run at once on one thread, each connector call yielding to
    /// the other worker first where the next bit of `yields` is set (see `Control::yields`), so
    /// both may read before either writes.
    TwoWorkers { batch: usize, yields: u64 },
    /// A fault of side's service, met by its `after`-th next request (0: the next one), of
    /// whatever kind: a read, a write batch, a delete (OData apps only).
    Service { side: Side, fault: Fault, after: u8 },
}

#[derive(Clone, Copy, Debug)]
pub enum Op {
    Stop,
    Start,
    Pause,
    Resume,
}

impl std::fmt::Debug for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Action::Edit { side, recs } => write!(f, "Edit({side:?}, {recs:?})"),
            Action::Feeds { limit } => write!(f, "Feeds({limit})"),
            Action::Step { step, batch } => write!(f, "{step:?}({batch})"),
            Action::Crash { point, batch } => write!(f, "Crash({}, {batch})", POINTS[*point].0),
            Action::Duplicate { step, pick } => write!(f, "Duplicate({step:?}, {:?})", pick),
            Action::Advance { ms } => write!(f, "Advance({ms})"),
            Action::BigEdit { side, parent } => write!(f, "BigEdit({side:?}, p{parent})"),
            Action::Delete { side, rec } => write!(f, "Delete({side:?}, {rec:?})"),
            Action::Fault { side, writes } => write!(f, "Fault({side:?}, {writes:?})"),
            Action::DuringWrite { target, side, rec, delete } => {
                write!(f, "DuringWrite(to {target:?}: {} {rec:?} on {side:?})", if *delete { "delete" } else { "edit" })
            }
            Action::Lifecycle(op) => write!(f, "{op:?}"),
            Action::Retry => write!(f, "Retry"),
            Action::TwoWorkers { batch, yields } => write!(f, "TwoWorkers({batch}, {yields:#x})"),
            Action::Service { side, fault, after } => write!(f, "Service({side:?}, {fault:?}, after {after})"),
        }
    }
}

pub fn side() -> impl Strategy<Value = Side> {
    prop_oneof![Just(Side::A), Just(Side::B)]
}

pub fn step_kind() -> impl Strategy<Value = StepKind> {
    prop_oneof![Just(StepKind::Capture), Just(StepKind::Sequence), Just(StepKind::Deliver)]
}

pub fn rec() -> impl Strategy<Value = Rec> {
    prop_oneof![(0..PARENTS).prop_map(Rec::Parent), (0..PARENTS, 1..=CHILDREN).prop_map(|(p, c)| Rec::Child(p, c))]
}

pub fn edit() -> impl Strategy<Value = Action> {
    (side(), prop::collection::vec(rec(), 1..4)).prop_map(|(side, recs)| Action::Edit { side, recs })
}

pub fn pipeline_action() -> impl Strategy<Value = Action> {
    prop_oneof![
        2 => (1usize..10).prop_map(|limit| Action::Feeds { limit }),
        6 => (step_kind(), 1usize..5).prop_map(|(step, batch)| Action::Step { step, batch }),
        3 => (0..POINTS.len(), 1usize..5).prop_map(|(point, batch)| Action::Crash { point, batch }),
        1 => (step_kind(), any::<Index>()).prop_map(|(step, pick)| Action::Duplicate { step, pick }),
        // Mostly short; now and then past the FIFO deduplication window (5 minutes).
        1 => prop_oneof![4 => 0i64..40_000, 1 => 250_000i64..400_000].prop_map(|ms| Action::Advance { ms }),
    ]
}

pub fn chaos_action() -> impl Strategy<Value = Action> {
    prop_oneof![1 => edit(), 2 => pipeline_action()]
}

pub fn big_edit() -> impl Strategy<Value = Action> {
    (side(), 0..PARENTS).prop_map(|(side, parent)| Action::BigEdit { side, parent })
}

/// Faults of the sqlite apps' connectors: writes that work, fail, are refused, or land and
/// time out.
pub fn fault_action() -> impl Strategy<Value = Action> {
    let writes = prop_oneof![
        3 => Just(Writes::Work),
        1 => Just(Writes::Fail),
        1 => Just(Writes::Refuse),
        1 => Just(Writes::LandThenFail),
    ];
    faults_among(1, (side(), writes).prop_map(|(side, writes)| Action::Fault { side, writes }))
}

/// Users' edits and deletes, the pipeline, and the apps' `faults` (weighed `weight` against 17
/// for the rest); besides, edits and deletes between a delivery's read and its write, the job's
/// lifecycle, retry requests and two workers on the same messages.
pub fn faults_among(weight: u32, faults: impl Strategy<Value = Action> + 'static) -> impl Strategy<Value = Action> {
    let op = prop_oneof![Just(Op::Stop), Just(Op::Start), Just(Op::Pause), Just(Op::Resume)];
    prop_oneof![
        4 => edit(),
        1 => (side(), rec()).prop_map(|(side, rec)| Action::Delete { side, rec }),
        8 => pipeline_action(),
        weight => faults,
        1 => (side(), side(), rec(), any::<bool>())
            .prop_map(|(target, side, rec, delete)| Action::DuringWrite { target, side, rec, delete }),
        1 => op.prop_map(Action::Lifecycle),
        1 => Just(Action::Retry),
        1 => (1usize..5, any::<u64>()).prop_map(|(batch, yields)| Action::TwoWorkers { batch, yields }),
    ]
}

// ---------------------------------------------------------------------------------------------
// The harness

/// A user's write made by an armed hook: (side, record, value (`None`: deleted), value replaced).
pub type HookEdit = (Side, Rec, Option<u64>, Option<u64>);

/// A user's write of one record: (record, value written, value it replaced).
pub type UserWrite = (Rec, u64, Option<u64>);

/// The two apps as their users and the pipeline meet them: what differs between sqlite apps
/// and OData services.
#[async_trait(?Send)]
pub trait Apps {
    /// One user transaction on `side` writing each of `recs` with the next value of `counter`
    /// (bumped per write): a child only where its parent exists, unless `orphans`. Returns what
    /// it wrote.
    fn edit(&mut self, side: Side, recs: &[Rec], counter: &mut u64, orphans: bool, txid: &str) -> Vec<UserWrite>;
    /// One user transaction deleting `r` on `side` (a parent with its children); returns what
    /// it deleted.
    fn delete(&mut self, side: Side, r: Rec, txid: &str) -> Vec<Rec>;
    /// The value `r` holds on `side` (`None`: no such record).
    fn value(&self, side: Side, r: Rec) -> Option<u64>;
    /// Every record of both apps with its version, and where their change feeds stand: what a
    /// redelivery must not change.
    fn dump(&self) -> Vec<Vec<String>>;
    /// Moves up to `limit` of each app's changes onto the capture queue, as the app sends them;
    /// returns how many moved.
    async fn feeds(&mut self, rt: &LocalRuntime, limit: usize) -> usize;
    /// A user's write of `value` to `rec` on `side` (a delete when `None`), made when the hook
    /// runs: it pushes what it did onto `edits`.
    fn user_hook(
        &self,
        side: Side,
        rec: Rec,
        value: Option<u64>,
        txid: String,
        edits: Arc<Mutex<Vec<HookEdit>>>,
    ) -> Hook;
    /// Takes note of what changed in the apps since the last call (after every action).
    fn observe(&mut self) {}
    /// A service's fault met by its `after`-th next request (sqlite apps have no service).
    fn service_fault(&mut self, side: Side, fault: &Fault, after: u8) {
        let _ = (side, fault, after);
    }
    /// The faults end: nothing more is armed on the services.
    fn end_faults(&mut self) {}
}

pub struct Harness {
    pub rt: LocalRuntime,
    pub lj: Arc<LoadedJob>,
    pub clock: ManualClock,
    pub primary: Side,
    /// The failpoint that fires (once) when reached.
    pub armed: Arc<Mutex<Option<String>>>,
    /// Crashes since the pipeline was last drained.
    pub crashes: usize,
    /// The apps: what their users write through.
    pub apps: Box<dyn Apps>,
    /// Fresh values: never repeat.
    pub counter: u64,
    pub txids: u64,
    pub dups: u64,
    /// The last value users wrote to each record on each side (A, B).
    pub last: BTreeMap<Rec, [Option<u64>; 2]>,
    /// Every value users wrote to each record.
    pub written: BTreeMap<Rec, Vec<u64>>,
    /// Per value users wrote: every value it replaced, directly (the value its side held when it
    /// was written) or through the one it replaced.
    pub replaced: HashMap<u64, BTreeSet<u64>>,
    /// When set, every message a step may have received: (step, group, body).
    pub log: Option<BTreeSet<(usize, Option<String>, String)>>,
    /// Whether a child may be created where its parent does not exist (the delivery then fails
    /// with a missing reference, an application error).
    pub orphans: bool,
    /// Each side's connector faults.
    pub controls: [Control; 2],
    /// Edits made by armed [`Action::DuringWrite`] hooks: (side, record, value, value replaced;
    /// `None` values for deletes), merged into the history after each action.
    pub hook_edits: Arc<Mutex<Vec<HookEdit>>>,
}

impl Harness {
    /// The runtime over `registry` (whose connectors `controls` govern) with job `def` (job
    /// `j`) applied and started, its apps `apps`.
    pub async fn start(
        primary: Side,
        def: JobDef,
        apps: Box<dyn Apps>,
        registry: Arc<dyn AppRegistry>,
        controls: [Control; 2],
    ) -> Harness {
        let clock = ManualClock::new(1_700_000_000_000);
        let armed: Arc<Mutex<Option<String>>> = Arc::default();
        let fire = armed.clone();
        let failpoints = Failpoints::new(move |point| {
            let mut armed = fire.lock().unwrap();
            if armed.as_deref() == Some(point) {
                *armed = None;
                true
            } else {
                false
            }
        });
        let db = EmbeddedDb::open_in_memory(Arc::new(clock.clone())).expect("state db");
        let rt = LocalRuntime::with_registry(db, Arc::new(clock.clone()), failpoints, registry);
        rt.apply(def).await.expect("apply");
        rt.start("j").await.expect("start");
        let lj = rt.steps.load_job("j").await.expect("load").expect("job");
        Harness {
            rt,
            lj,
            clock,
            primary,
            armed,
            crashes: 0,
            apps,
            counter: 0,
            txids: 0,
            dups: 0,
            last: BTreeMap::new(),
            written: BTreeMap::new(),
            replaced: HashMap::new(),
            log: None,
            orphans: false,
            controls,
            hook_edits: Arc::default(),
        }
    }

    /// Records a user's write (or delete, `v` = `None`) in the history.
    fn remember(&mut self, side: Side, r: Rec, v: Option<u64>, before: Option<u64>) {
        self.last.entry(r).or_default()[side.index()] = v;
        let Some(v) = v else { return };
        self.written.entry(r).or_default().push(v);
        let mut replaced = BTreeSet::new();
        if let Some(b) = before {
            replaced.insert(b);
            replaced.extend(self.replaced.get(&b).into_iter().flatten().copied());
        }
        self.replaced.insert(v, replaced);
    }

    fn merge_hook_edits(&mut self) {
        let edits: Vec<_> = std::mem::take(&mut *self.hook_edits.lock().unwrap());
        for (side, r, v, before) in edits {
            self.remember(side, r, v, before);
        }
    }

    /// One app transaction deleting `r` on `side` (a parent with its children).
    fn delete(&mut self, side: Side, r: Rec) {
        self.txids += 1;
        let txid = format!("app-{}", self.txids);
        for d in self.apps.delete(side, r, &txid) {
            self.remember(side, d, None, None);
        }
    }

    /// One app transaction on `side`; returns the records written and their values.
    pub fn edit(&mut self, side: Side, recs: &[Rec]) -> Vec<(Rec, u64)> {
        self.edit_padded(side, recs, 0)
    }

    /// [`Self::edit`] under a transaction id `pad` bytes longer.
    fn edit_padded(&mut self, side: Side, recs: &[Rec], pad: usize) -> Vec<(Rec, u64)> {
        self.txids += 1;
        let txid = format!("app-{}{}", self.txids, "x".repeat(pad));
        let written = self.apps.edit(side, recs, &mut self.counter, self.orphans, &txid);
        for &(r, v, before) in &written {
            self.remember(side, r, Some(v), before);
        }
        written.into_iter().map(|(r, v, _)| (r, v)).collect()
    }

    pub fn value(&self, side: Side, r: Rec) -> Option<u64> {
        self.apps.value(side, r)
    }

    /// Every record of both apps, versions included, and where their change feeds stand.
    pub fn dump(&self) -> Vec<Vec<String>> {
        self.apps.dump()
    }

    /// Runs one step once on up to `batch` messages; returns how many it took.
    pub async fn step(&mut self, step: StepKind, batch: usize) -> usize {
        let queue = self.rt.queue(step).clone();
        if let Some(log) = &mut self.log {
            let i = STEPS.iter().position(|s| *s == step).expect("step");
            log.extend(queue.peek_all().expect("peek").into_iter().map(|m| (i, m.group, m.body)));
        }
        let steps = &self.rt.steps;
        let input = queue.as_ref();
        run_once(input, batch, &|m| async move {
            let r = steps.handle(step, input, &m).await;
            (m, r)
        })
        .await
        .expect("step")
    }

    pub async fn resend(&mut self, step: StepKind, group: Option<String>, body: String) {
        let msg = match step {
            StepKind::Deliver => {
                self.dups += 1;
                OutMessage::fifo(body, group.expect("FIFO group"), format!("duplicate-{}", self.dups))
            }
            _ => OutMessage::standard(body),
        };
        self.rt.queue(step).send(vec![msg]).await.expect("send");
    }

    /// Applies an action; returns the edits it made: (side, record, value).
    pub async fn act(&mut self, a: &Action) -> Vec<(Side, Rec, u64)> {
        let made = self.act_on(a).await;
        self.merge_hook_edits();
        self.apps.observe();
        made
    }

    async fn act_on(&mut self, a: &Action) -> Vec<(Side, Rec, u64)> {
        match a {
            Action::Edit { side, recs } => {
                return self.edit(*side, recs).into_iter().map(|(r, v)| (*side, r, v)).collect();
            }
            Action::Feeds { limit } => {
                self.apps.feeds(&self.rt, *limit).await;
            }
            Action::Step { step, batch } => {
                self.step(*step, *batch).await;
            }
            Action::Crash { point, batch } => {
                let (name, step) = POINTS[*point];
                let may_crash = self.may_crash(step);
                if may_crash {
                    *self.armed.lock().unwrap() = Some(name.to_string());
                }
                self.step(step, *batch).await;
                // Still armed: the step did not get there (nothing to do, or not that far).
                if self.armed.lock().unwrap().take().is_none() && may_crash {
                    self.crashes += 1;
                    self.clock.advance(PAST_VISIBILITY_MS);
                }
            }
            Action::Duplicate { step, pick } => {
                let msgs = self.rt.queue(*step).peek_all().expect("peek");
                if !msgs.is_empty() {
                    let m = pick.get(&msgs).clone();
                    self.resend(*step, m.group, m.body).await;
                }
            }
            Action::Advance { ms } => self.clock.advance(*ms),
            Action::BigEdit { side, parent } => {
                let recs: Vec<Rec> = std::iter::once(Rec::Parent(*parent))
                    .chain((1..=BIG_CHILDREN).map(|c| Rec::Child(*parent, c)))
                    .collect();
                let written = self.edit_padded(*side, &recs, BIG_TXID_BYTES);
                return written.into_iter().map(|(r, v)| (*side, r, v)).collect();
            }
            Action::Delete { side, rec } => self.delete(*side, *rec),
            Action::Fault { side, writes } => self.controls[side.index()].set(*writes),
            Action::DuringWrite { target, side, rec, delete } => {
                self.counter += 1;
                let (value, side, rec, delete) = (self.counter, *side, *rec, *delete);
                self.txids += 1;
                let txid = format!("app-{}", self.txids);
                let value = (!delete).then_some(value);
                let hook = self.apps.user_hook(side, rec, value, txid, self.hook_edits.clone());
                *self.controls[target.index()].before_write.lock().unwrap() = Some(hook);
            }
            Action::Service { side, fault, after } => self.apps.service_fault(*side, fault, *after),
            Action::Lifecycle(op) => {
                // Whatever the status: an operator's command the job refuses changes nothing.
                let admin = self.rt.admin();
                let _ = match op {
                    Op::Stop => self.rt.stop("j").await.map_err(|e| e.to_string()),
                    Op::Start => self.rt.start("j").await.map_err(|e| e.to_string()),
                    Op::Pause => admin.pause("j").await.map(|_| ()).map_err(|e| e.to_string()),
                    Op::Resume => admin.resume("j").await.map(|_| ()).map_err(|e| e.to_string()),
                };
            }
            Action::Retry => {
                // Refused when nothing is open or the job is not active: nothing to do then.
                let _ = self.rt.admin().submit("j", RequestAction::Retry, ErrorFilter::default()).await;
            }
            Action::TwoWorkers { batch, yields } => self.two_workers(*batch, *yields).await,
        }
        Vec::new()
    }

    /// Whether a step may receive its messages once without handling them (a crash, or the
    /// first of two workers) and still keep them all out of the dead-letter queue (see
    /// [`MAX_CRASHES`]).
    fn may_crash(&self, step: StepKind) -> bool {
        let msgs = self.rt.queue(step).peek_all().expect("peek");
        self.crashes < MAX_CRASHES && msgs.iter().all(|m| m.receive_count < MAX_CRASHES as u32)
    }

    /// [`Action::TwoWorkers`]. The second receive counts as a crash (the message is received
    /// once more than it is handled): past [`MAX_CRASHES`] it is an ordinary step.
    async fn two_workers(&mut self, batch: usize, yields: u64) {
        if !self.may_crash(StepKind::Deliver) {
            self.step(StepKind::Deliver, batch).await;
            return;
        }
        let queue = self.rt.queue(StepKind::Deliver).clone();
        let first = queue.receive(batch).await.expect("receive");
        if first.is_empty() {
            return;
        }
        self.crashes += 1;
        self.clock.advance(PAST_VISIBILITY_MS);
        let second = queue.receive(batch).await.expect("receive");
        for c in &self.controls {
            c.yields.store(yields, std::sync::atomic::Ordering::SeqCst);
        }
        let (steps, input) = (&self.rt.steps, queue.as_ref());
        let (one, two) = tokio::join!(
            steps.handle(StepKind::Deliver, input, &first),
            steps.handle(StepKind::Deliver, input, &second)
        );
        for c in &self.controls {
            c.yields.store(0, std::sync::atomic::Ordering::SeqCst);
        }
        // Each worker answers for what it received, as `run_once` does: the first one's receipts
        // are stale by now, so only the second one's answers count.
        for (msgs, result) in [(&first, one), (&second, two)] {
            match result {
                Ok(outcomes) => settle(input, msgs, &outcomes).await.expect("settle"),
                Err(StepError::Crashed(_)) => {}
                Err(e) => panic!("deliver failed: {e}"),
            }
        }
    }

    /// Ends the faults: apps write again, the job runs, every open error is retried (a few
    /// times, each after a drain), as an operator would once the apps are back.
    pub async fn settle(&mut self) -> Result<(), TestCaseError> {
        for c in &self.controls {
            c.set(Writes::Work);
            c.before_write.lock().unwrap().take();
        }
        self.apps.end_faults();
        match self.rt.state.job("j").await.expect("job").1 {
            JobStatus::Stopped => self.rt.start("j").await.expect("start"),
            JobStatus::Paused | JobStatus::Resuming => {
                self.rt.admin().resume("j").await.expect("resume");
            }
            _ => {}
        }
        self.drain().await?;
        for _ in 0..3 {
            if self.rt.admin().submit("j", RequestAction::Retry, ErrorFilter::default()).await.is_err() {
                break;
            }
            self.drain().await?;
        }
        Ok(())
    }

    /// Runs every step until the pipeline is idle, moving the clock past the visibility timeout
    /// between rounds; a failure if it does not get there.
    pub async fn drain(&mut self) -> Result<(), TestCaseError> {
        for _ in 0..DRAIN_ROUNDS {
            for _ in 0..1000 {
                self.apps.observe();
                let mut moved = self.apps.feeds(&self.rt, BATCH).await;
                for step in STEPS {
                    moved += self.step(step, 8).await;
                }
                if moved == 0 {
                    break;
                }
            }
            if self.rt.is_idle().await.expect("idle") {
                self.crashes = 0;
                return Ok(());
            }
            self.clock.advance(PAST_VISIBILITY_MS);
        }
        let queues: Vec<_> = STEPS.iter().map(|s| (s, self.rt.queue(*s).peek_all().expect("peek"))).collect();
        Err(TestCaseError::fail(format!("the pipeline did not drain in {DRAIN_ROUNDS} rounds: {queues:#?}")))
    }

    pub async fn error_rows(&self) -> Vec<SyncError> {
        let rows = self.rt.state.error_rows("j", &ErrorFilter::default()).await.expect("error rows");
        rows.into_iter().map(|(_, e)| e).collect()
    }

    pub async fn conflicts(&self) -> Vec<ConflictRecord> {
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = self.rt.state.conflicts("j", 500, after.as_deref()).await.expect("conflicts");
            out.extend(page.items);
            match page.next {
                Some(n) => after = Some(n),
                None => return out,
            }
        }
    }

    /// The invariant after a drain: nothing dead-lettered; every record in step on both sides
    /// unless it has an open error to retry, and no such error on a record that is in step; no
    /// update lost. Without orphans, no open error at all.
    pub async fn check_converged(&self) -> Result<(), TestCaseError> {
        for (i, dlq) in self.rt.dead_letters.iter().enumerate() {
            let msgs = dlq.peek_all().expect("peek");
            prop_assert!(msgs.is_empty(), "dead-letter queue {i} holds messages: {msgs:#?}");
        }
        let errors = self.error_rows().await;
        let conflicts = self.conflicts().await;
        let open: Vec<&SyncError> = errors
            .iter()
            .filter(|e| matches!(e.status, ErrorStatus::Open | ErrorStatus::Retrying) && e.category.retriable())
            .collect();
        // Children created only where their parent exists, and deliveries keeping a parent
        // before its children: no missing reference; and sqlite apps have no system failures.
        prop_assert!(self.orphans || open.is_empty(), "open application/system errors: {open:#?}");
        // "Every link with no open error is in step": a record with an open retriable error is
        // exempt. A concurrency skip (not retriable) exempts nothing: a newer change of the
        // record exists and is delivered.
        let exempt: HashSet<(String, Key)> = open.iter().map(|e| (e.map.clone(), e.key.clone())).collect();
        let mut out_of_step: HashSet<(String, Key)> = HashSet::new();
        for cmp in verify::compare(&self.lj).await.expect("compare") {
            out_of_step
                .extend(cmp.differ.iter().chain(cmp.only.iter().flatten()).map(|k| (cmp.map.clone(), k.clone())));
            let unexcused: Vec<&Key> = cmp
                .differ
                .iter()
                .chain(cmp.only.iter().flatten())
                .filter(|k| !exempt.contains(&(cmp.map.clone(), (*k).clone())))
                .collect();
            prop_assert!(
                unexcused.is_empty(),
                "map {}: out of step after draining, with no open error: {unexcused:?}\ncomparison: {cmp:?}\napps: \
                 {:#?}\nerrors: {errors:#?}",
                cmp.map,
                self.dump()
            );
        }
        // And the other way round: an error still open on a record in step misleads operators
        // (and no later sync of the record would resolve it).
        let stale: Vec<&&SyncError> =
            open.iter().filter(|e| !out_of_step.contains(&(e.map.clone(), e.key.clone()))).collect();
        prop_assert!(stale.is_empty(), "open errors of records that are in step: {stale:#?}");
        // The small model's records, and any other a user wrote (the children of big edits).
        let recs: BTreeSet<Rec> = all_recs().chain(self.written.keys().copied()).collect();
        for r in recs {
            if exempt.contains(&(r.map().to_string(), r.key())) {
                continue;
            }
            let Some(v) = self.value(Side::A, r) else { continue };
            // Written by a user at some point (deletes and resurrections aside, never invented).
            prop_assert!(self.written.get(&r).is_some_and(|w| w.contains(&v)), "{r:?} holds {v}, which no user wrote");
            let last = self.last.get(&r).copied().unwrap_or_default();
            prop_assert!(
                last.contains(&Some(v)),
                "{r:?} holds {v} on both sides, but the last values users wrote to it (A, B) are {last:?}: an \
                 older value came back"
            );
            // A write whose outcome was unknown (a time-out) proves nothing about a later edit of
            // its target: the two are decided as a conflict, by the primary, with a row that
            // says so. Such a decision is not a silent loss.
            let map = &self.lj.job.maps[r.map_idx()];
            let hash = canon::hash(&canon::canon(map, Side::A, &r.fields_a(v)).expect("canon"));
            let decided = conflicts
                .iter()
                .any(|c| c.map == r.map() && c.key == r.key() && c.hashes[self.primary.index()] == hash);
            let newer: Vec<(u64, &BTreeSet<u64>)> = self.written[&r]
                .iter()
                .filter(|_| !decided)
                .filter_map(|w| self.replaced.get(w).filter(|p| p.contains(&v)).map(|p| (*w, p)))
                .collect();
            prop_assert!(
                newer.is_empty(),
                "{r:?} holds {v} on both sides, but users replaced that value (value, what it replaced): \
                 {newer:?}: a lost update"
            );
        }
        Ok(())
    }
}

pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime").block_on(f)
}

/// Fails the test with the property's message.
pub fn run(r: Result<(), TestCaseError>) {
    if let Err(e) = r {
        panic!("{e}");
    }
}
