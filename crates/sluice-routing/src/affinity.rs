//! Object affinity: the backend that owns an object a call names.
//!
//! Objects that Azure OpenAI stores (responses, files, batches, vector stores, conversations, stored chat
//! completions, fine-tuning jobs, assistants, threads, uploads) exist only on the resource that created them. The
//! gateway learns each new id from the answer to the call that created it ([`creates`]), keeps id → backend in an
//! [`AffinityMap`], and sends every later call that names the id, in its path ([`owned_id_in_path`]) or in its JSON
//! body ([`owned_ids_in_body`]), to that backend.

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use serde::Deserialize;
use serde::de::{Deserializer, Visitor};

/// The kinds of object that live on one backend only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OwnedKind {
    /// A stored response of the Responses API (`resp_…`).
    Response,
    /// An uploaded file (`file-…`, or `assistant-…` for some older Azure uploads).
    File,
    /// A batch job (`batch_…`).
    Batch,
    /// A vector store (`vs_…`), with its files and file batches.
    VectorStore,
    /// A conversation of the Conversations API (`conv_…`), with its items.
    Conversation,
    /// A chat completion stored with `store: true` (`chatcmpl-…`).
    ChatCompletion,
    /// A fine-tuning job (`ftjob-…`), with its events and checkpoints.
    FineTuningJob,
    /// An assistant of the Assistants API (`asst_…`).
    Assistant,
    /// A thread of the Assistants API (`thread_…`), with its messages and runs.
    Thread,
    /// A multi-part upload (`upload_…`).
    Upload,
}

impl OwnedKind {
    /// Every kind, in declaration order (for metrics that want a series per kind).
    pub const ALL: [OwnedKind; 10] = [
        OwnedKind::Response,
        OwnedKind::File,
        OwnedKind::Batch,
        OwnedKind::VectorStore,
        OwnedKind::Conversation,
        OwnedKind::ChatCompletion,
        OwnedKind::FineTuningJob,
        OwnedKind::Assistant,
        OwnedKind::Thread,
        OwnedKind::Upload,
    ];

    /// A short lowercase name for metric labels and trace fields, such as `"vector_store"`.
    pub fn as_str(self) -> &'static str {
        match self {
            OwnedKind::Response => "response",
            OwnedKind::File => "file",
            OwnedKind::Batch => "batch",
            OwnedKind::VectorStore => "vector_store",
            OwnedKind::Conversation => "conversation",
            OwnedKind::ChatCompletion => "chat_completion",
            OwnedKind::FineTuningJob => "fine_tuning_job",
            OwnedKind::Assistant => "assistant",
            OwnedKind::Thread => "thread",
            OwnedKind::Upload => "upload",
        }
    }
}

/// The longest id, in bytes, that [`plausible_id`] accepts.
pub const MAX_ID_LEN: usize = 256;

/// The most ids [`owned_ids_in_body`] reports for one body.
pub const MAX_IDS_IN_BODY: usize = 16;

/// Whether `id` could be the id of an object: at most [`MAX_ID_LEN`] bytes of ASCII letters, digits, `_`, `.`, `:`
/// and `-`, with at least one character other than `.` (so it is neither empty nor a `.` or `..` path segment).
///
/// The gateway should apply the same test to an id it reads from a create answer before it remembers it.
pub fn plausible_id(id: &str) -> bool {
    id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'_' | b'.' | b':' | b'-'))
        && id.bytes().any(|byte| byte != b'.')
}

/// The segments of a path after the API prefix, past an optional leading `v1`; `None` when a segment is empty.
///
/// Anything from a `?` or `#` on is dropped first, then one leading and one trailing slash.
fn segments(rest_path: &str) -> Option<impl Iterator<Item = &str>> {
    let path = match rest_path.find(['?', '#']) {
        Some(end) => &rest_path[..end],
        None => rest_path,
    };
    let path = path.strip_prefix('/').unwrap_or(path);
    let path = path.strip_suffix('/').unwrap_or(path);
    if path.split('/').any(str::is_empty) {
        return None;
    }
    let mut segments = path.split('/').peekable();
    segments.next_if_eq(&"v1");
    Some(segments)
}

/// Takes the next segment if it is `name`.
fn expect<'p>(segments: &mut impl Iterator<Item = &'p str>, name: &str) -> Option<()> {
    (segments.next()? == name).then_some(())
}

/// The family of objects whose collection the path starts with, having taken the collection's segments:
/// `responses`, `files`, `chat/completions` (also as `deployments/{name}/chat/completions`), `fine_tuning/jobs`...
fn family<'p>(segments: &mut impl Iterator<Item = &'p str>) -> Option<OwnedKind> {
    let kind = match segments.next()? {
        "responses" => OwnedKind::Response,
        "files" => OwnedKind::File,
        "batches" => OwnedKind::Batch,
        "vector_stores" => OwnedKind::VectorStore,
        "conversations" => OwnedKind::Conversation,
        "assistants" => OwnedKind::Assistant,
        "threads" => OwnedKind::Thread,
        "uploads" => OwnedKind::Upload,
        "fine_tuning" => {
            expect(segments, "jobs")?;
            OwnedKind::FineTuningJob
        }
        "chat" => {
            expect(segments, "completions")?;
            OwnedKind::ChatCompletion
        }
        "deployments" => {
            segments.next()?;
            expect(segments, "chat")?;
            expect(segments, "completions")?;
            OwnedKind::ChatCompletion
        }
        _ => return None,
    };
    Some(kind)
}

/// The owned object a call's path names, if any.
///
/// `rest_path` is the path after the API prefix (`/openai`), in the v1 form (`/v1/files/{id}`) or the api-version
/// form (`/files/{id}`); a query string or fragment, if present, is ignored, and so is one trailing slash. The id is
/// the segment right after the collection, and it names the owner of everything below it:
///
/// - `/responses/{id}`, `…/input_items`, `…/cancel`;
/// - `/files/{id}`, `…/content`;
/// - `/batches/{id}`, `…/cancel`;
/// - `/vector_stores/{id}/…` (the vector store owns its files and file batches: `/vector_stores/{vs}/files/{file}`
///   names the vector store);
/// - `/conversations/{id}/…`;
/// - `/chat/completions/{id}`, `…/messages` (also below `/deployments/{name}/`);
/// - `/fine_tuning/jobs/{id}/…` (`events`, `checkpoints`, `cancel`, `pause`, `resume`);
/// - `/assistants/{id}`;
/// - `/threads/{id}/…` (the thread owns its messages and runs);
/// - `/uploads/{id}/…` (`parts`, `complete`, `cancel`).
///
/// A collection (`/files`, `/v1/responses`, `/chat/completions`) names nothing, nor do the calls that sit beside
/// the ids: `/responses/input_tokens`, `/responses/compact` and `/threads/runs`. Segments are compared exactly (case
/// included); a path with an empty segment (`/files//content`), or whose id is not [`plausible_id`], names nothing.
pub fn owned_id_in_path(rest_path: &str) -> Option<(OwnedKind, &str)> {
    let mut segments = segments(rest_path)?;
    let kind = family(&mut segments)?;
    let id = segments.next()?;
    let beside_ids: &[&str] = match kind {
        OwnedKind::Response => &["input_tokens", "compact"],
        OwnedKind::Thread => &["runs"],
        _ => &[],
    };
    (plausible_id(id) && !beside_ids.contains(&id)).then_some((kind, id))
}

/// The kind of owned object a call creates, when the answer to it carries the new object's id.
///
/// A POST (method compared without regard to case) to a collection, in the v1 or the api-version form: `/responses`,
/// `/files`, `/batches`, `/vector_stores`, `/conversations`, `/fine_tuning/jobs`, `/assistants`, `/threads`,
/// `/threads/runs` (a thread created together with its first run), `/uploads`, and `/chat/completions` (also as
/// `/deployments/{name}/chat/completions`). A chat completion is kept only when the body asks for it with
/// `store: true` ([`asks_to_store`]), so the gateway should remember one only then. Paths below an object
/// (`/responses/{id}/cancel`, `/threads/{id}/runs`) create nothing that has an owner of its own.
///
/// Where the id sits in the answer is the caller's business: `id` of the object returned, except for
/// `/threads/runs`, whose answer is the run, with the new thread's id in `thread_id`.
pub fn creates(method: &str, rest_path: &str) -> Option<OwnedKind> {
    if !method.eq_ignore_ascii_case("POST") {
        return None;
    }
    let mut segments = segments(rest_path)?;
    let kind = family(&mut segments)?;
    match segments.next() {
        None => Some(kind),
        Some("runs") if kind == OwnedKind::Thread && segments.next().is_none() => Some(kind),
        _ => None,
    }
}

/// Parses a body that is a JSON object; anything else (another JSON value, invalid JSON, or a body serde rejects)
/// gives `None`. Leading whitespace is allowed, as in JSON.
fn json_object<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Option<T> {
    // Derived structs also accept a JSON array (as a tuple of their fields), so the shape is checked first.
    if body.trim_ascii_start().first() != Some(&b'{') {
        return None;
    }
    serde_json::from_slice(body).ok()
}

/// Whether a JSON request body asks for its chat completion to be stored: a top-level `store` that is the boolean
/// `true`. Anything else (`false`, absent, `null`, `"true"`, a body that is not a JSON object) is no.
pub fn asks_to_store(body: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct Store {
        #[serde(default)]
        store: bool,
    }
    json_object::<Store>(body).is_some_and(|body| body.store)
}

/// A JSON string, borrowed from the body unless it had escapes.
struct Text<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TextVisitor;

        impl<'de> Visitor<'de> for TextVisitor {
            type Value = Text<'de>;

            fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
                formatter.write_str("an id string")
            }

            fn visit_borrowed_str<E>(self, text: &'de str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Borrowed(text)))
            }

            fn visit_str<E>(self, text: &str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(text.to_owned())))
            }
        }

        deserializer.deserialize_str(TextVisitor)
    }
}

/// A `conversation` field: the id itself, or an object holding it.
#[derive(Deserialize)]
#[serde(untagged)]
enum ConversationRef<'a> {
    Id(#[serde(borrow)] Text<'a>),
    Object {
        #[serde(borrow)]
        id: Option<Text<'a>>,
    },
}

/// A `tools` entry (the Responses API's `file_search` tool names vector stores).
#[derive(Deserialize)]
struct Tool<'a> {
    #[serde(borrow)]
    vector_store_ids: Option<Vec<Text<'a>>>,
}

/// `tool_resources` of an assistant, a thread or a run.
#[derive(Deserialize)]
struct ToolResources<'a> {
    #[serde(borrow)]
    code_interpreter: Option<FileIds<'a>>,
    #[serde(borrow)]
    file_search: Option<VectorStoreIds<'a>>,
}

#[derive(Deserialize)]
struct FileIds<'a> {
    #[serde(borrow)]
    file_ids: Option<Vec<Text<'a>>>,
}

#[derive(Deserialize)]
struct VectorStoreIds<'a> {
    #[serde(borrow)]
    vector_store_ids: Option<Vec<Text<'a>>>,
}

/// The fields of a request body that name owned objects; every other field is skipped unread.
#[derive(Deserialize)]
struct NamedIds<'a> {
    #[serde(borrow)]
    previous_response_id: Option<Text<'a>>,
    #[serde(borrow)]
    conversation: Option<ConversationRef<'a>>,
    #[serde(borrow)]
    thread_id: Option<Text<'a>>,
    #[serde(borrow)]
    assistant_id: Option<Text<'a>>,
    #[serde(borrow)]
    input_file_id: Option<Text<'a>>,
    #[serde(borrow)]
    training_file: Option<Text<'a>>,
    #[serde(borrow)]
    validation_file: Option<Text<'a>>,
    #[serde(borrow)]
    file_id: Option<Text<'a>>,
    #[serde(borrow)]
    file_ids: Option<Vec<Text<'a>>>,
    #[serde(borrow)]
    tools: Option<Vec<Tool<'a>>>,
    #[serde(borrow)]
    tool_resources: Option<ToolResources<'a>>,
}

/// The ids found so far: distinct, plausible, and no more than [`MAX_IDS_IN_BODY`].
#[derive(Default)]
struct Found(Vec<(OwnedKind, String)>);

impl Found {
    fn add(&mut self, kind: OwnedKind, id: Option<&Text<'_>>) {
        let Some(Text(id)) = id else { return };
        if self.0.len() < MAX_IDS_IN_BODY
            && plausible_id(id)
            && !self
                .0
                .iter()
                .any(|(seen_kind, seen)| *seen_kind == kind && seen == id)
        {
            self.0.push((kind, id.to_string()));
        }
    }

    fn add_all(&mut self, kind: OwnedKind, ids: Option<&Vec<Text<'_>>>) {
        for id in ids.into_iter().flatten() {
            self.add(kind, Some(id));
        }
    }
}

/// The owned objects a JSON request body names, in this order of fields:
///
/// - `previous_response_id` (a response);
/// - `conversation`, as the id itself or as `{"id": …}` (a conversation);
/// - `thread_id` and `assistant_id` (Assistants API);
/// - `input_file_id` (a batch's input file), `training_file` and `validation_file` (a fine-tuning job's files),
///   `file_id` and the array `file_ids` (files);
/// - `tools[].vector_store_ids` (the `file_search` tool's vector stores);
/// - `tool_resources.code_interpreter.file_ids` and `tool_resources.file_search.vector_store_ids` (the files and
///   vector stores of an assistant, a thread or a run).
///
/// Only these top-level fields are read; the rest of the body is checked as JSON but not kept. Each (kind, id) is
/// reported once, ids that are not [`plausible_id`] are skipped, and at most [`MAX_IDS_IN_BODY`] are reported. A body
/// that is not a JSON object, or in which one of these fields has a shape other than the one above (such as a
/// number, or a field given twice), names nothing: the backend would refuse such a body anyway. `null` stands for
/// an absent field.
pub fn owned_ids_in_body(body: &[u8]) -> Vec<(OwnedKind, String)> {
    let Some(named) = json_object::<NamedIds<'_>>(body) else {
        return Vec::new();
    };
    let mut found = Found::default();
    found.add(OwnedKind::Response, named.previous_response_id.as_ref());
    let conversation = match &named.conversation {
        Some(ConversationRef::Id(id)) => Some(id),
        Some(ConversationRef::Object { id }) => id.as_ref(),
        None => None,
    };
    found.add(OwnedKind::Conversation, conversation);
    found.add(OwnedKind::Thread, named.thread_id.as_ref());
    found.add(OwnedKind::Assistant, named.assistant_id.as_ref());
    found.add(OwnedKind::File, named.input_file_id.as_ref());
    found.add(OwnedKind::File, named.training_file.as_ref());
    found.add(OwnedKind::File, named.validation_file.as_ref());
    found.add(OwnedKind::File, named.file_id.as_ref());
    found.add_all(OwnedKind::File, named.file_ids.as_ref());
    for tool in named.tools.iter().flatten() {
        found.add_all(OwnedKind::VectorStore, tool.vector_store_ids.as_ref());
    }
    if let Some(resources) = &named.tool_resources {
        let code = resources.code_interpreter.as_ref();
        found.add_all(
            OwnedKind::File,
            code.and_then(|code| code.file_ids.as_ref()),
        );
        let search = resources.file_search.as_ref();
        found.add_all(
            OwnedKind::VectorStore,
            search.and_then(|search| search.vector_store_ids.as_ref()),
        );
    }
    found.0
}

/// The most shards an [`AffinityMap`] is cut into.
const MAX_SHARDS: usize = 16;

/// The fewest entries a shard is given room for, when the map is large enough to have more than one.
const MIN_SHARD_ENTRIES: usize = 64;

/// How many outdated places a shard's insertion order may hold beyond twice its entries before it is compacted.
const STALE_SLACK: usize = 16;

/// A bounded, thread-safe map from an object's id to what the gateway knows of it (typically the backend that owns
/// it), with a fixed time to live.
///
/// An entry expires `ttl` after it was inserted (inserting it again starts its time anew; reading it does not):
/// from then on [`get`](Self::get) no longer returns it. When a shard is full, inserting a new id first drops the
/// shard's expired entries, then, if it is still full, its oldest insertion.
///
/// # Design
///
/// The ids are spread by a randomly keyed hash over up to 16 shards, each a `std::sync::Mutex` held only for the
/// operation at hand. A map for fewer than 128 entries has a single shard; a larger one has a shard per 64 entries,
/// up to 16. The room is divided so that the shards' capacities add up to `max_entries` exactly (they differ by one
/// at most), so the map never holds more than `max_entries` entries; eviction picks the oldest insertion of the
/// id's shard, which over many ids approximates the oldest insertion of the map.
///
/// Each shard keeps a `HashMap` from the id to its value and expiry, and a queue of the ids in insertion order. The
/// two share the id's bytes through one `Arc<str>`. Replacing or removing an entry leaves its old place in the
/// queue behind; such a place is recognised as outdated because the map no longer holds that very `Arc`, it is
/// skipped when it reaches the front, and the queue is compacted whenever outdated places outnumber the entries
/// (plus a small slack). Since all entries share one time to live, the queue is also in order of expiry, so
/// expired entries are always found at its front. To keep it so when concurrent callers' `now` readings arrive a
/// little out of order, an entry's expiry is never set earlier than that of the entry inserted before it in its
/// shard (at worst it lives longer by the spread between those readings).
///
/// # Cost
///
/// [`get`](Self::get), [`insert`](Self::insert) and [`remove`](Self::remove) take O(1) expected time, amortised:
/// every entry is dropped from the front of a queue once, and each compaction, O(n) in the shard's size, follows at
/// least as many replacements or removals. [`sweep`](Self::sweep) costs O(shards + expired entries), and
/// [`len`](Self::len) and [`is_empty`](Self::is_empty) O(shards).
///
/// Memory per entry: the id's bytes plus an `Arc` header (16 bytes), a hash-map slot (the 16-byte `Arc<str>`, the
/// value, a 16-byte expiry, one control byte, at the map's load factor), and one or two 16-byte queue places.
///
/// A poisoned shard lock is taken over as it is: each operation leaves the shard consistent at every point where
/// a value's `Drop` or `Clone` could panic.
pub struct AffinityMap<V> {
    shards: Box<[Mutex<Shard<V>>]>,
    pick: RandomState,
    ttl: Duration,
    max_entries: usize,
}

struct Entry<V> {
    value: V,
    expires: Duration,
}

struct Shard<V> {
    entries: HashMap<Arc<str>, Entry<V>>,
    /// Every entry's id, oldest insertion first, along with outdated places (see [`live`]).
    order: VecDeque<Arc<str>>,
    capacity: usize,
    /// The expiry of the latest insertion; no later insertion expires before it.
    latest_expiry: Duration,
}

/// The entry a place in a shard's order stands for, if the place is not outdated: the map still holds the very same
/// `Arc` as its key (a replaced entry has a new one).
fn live<'m, V>(entries: &'m HashMap<Arc<str>, Entry<V>>, place: &Arc<str>) -> Option<&'m Entry<V>> {
    let (key, entry) = entries.get_key_value(&**place)?;
    Arc::ptr_eq(key, place).then_some(entry)
}

impl<V> Shard<V> {
    fn new(capacity: usize) -> Self {
        Shard {
            entries: HashMap::new(),
            order: VecDeque::new(),
            capacity,
            latest_expiry: Duration::ZERO,
        }
    }

    /// Drops the entries expired at `now` (all at the front of the order), and the outdated places among them.
    fn drop_expired(&mut self, now: Duration) -> usize {
        let mut dropped = 0;
        while let Some(oldest) = self.order.front() {
            if let Some(entry) = live(&self.entries, oldest) {
                if now < entry.expires {
                    break;
                }
                self.entries.remove(&**oldest);
                dropped += 1;
            }
            self.order.pop_front();
        }
        dropped
    }

    /// Drops the oldest insertion still held.
    fn evict_oldest(&mut self) {
        while let Some(oldest) = self.order.pop_front() {
            if live(&self.entries, &oldest).is_some() {
                self.entries.remove(&*oldest);
                return;
            }
        }
    }

    /// Compacts the order once outdated places outnumber the entries by more than the slack.
    fn forget_outdated(&mut self) {
        if self.order.len() > 2 * self.entries.len() + STALE_SLACK {
            let entries = &self.entries;
            self.order.retain(|place| live(entries, place).is_some());
        }
    }

    fn get(&mut self, id: &str, now: Duration) -> Option<V>
    where
        V: Clone,
    {
        let entry = self.entries.get(id)?;
        if now < entry.expires {
            return Some(entry.value.clone());
        }
        // Every entry ahead of this one in the order has expired too, so this reaches it.
        self.drop_expired(now);
        None
    }

    fn insert(&mut self, id: &str, value: V, now: Duration, ttl: Duration) {
        if self.capacity == 0 {
            return;
        }
        self.drop_expired(now);
        if self.entries.remove(id).is_none() && self.entries.len() >= self.capacity {
            self.evict_oldest();
        }
        let expires = now.saturating_add(ttl).max(self.latest_expiry);
        self.latest_expiry = expires;
        let key: Arc<str> = Arc::from(id);
        // The place goes in first: should anything fail in between, an outdated place is harmless, whereas an entry
        // without one could never be evicted.
        self.order.push_back(Arc::clone(&key));
        self.entries.insert(key, Entry { value, expires });
        self.forget_outdated();
    }

    fn remove(&mut self, id: &str) {
        self.entries.remove(id);
        self.forget_outdated();
    }
}

fn lock<V>(shard: &Mutex<Shard<V>>) -> MutexGuard<'_, Shard<V>> {
    // Every operation leaves the shard consistent (see the map's documentation), so a poisoned lock is taken over.
    shard.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<V> AffinityMap<V> {
    /// A map holding at most `max_entries` entries, each for `ttl` after its insertion. A map for 0 entries holds
    /// nothing.
    pub fn new(max_entries: usize, ttl: Duration) -> Self {
        let shards = (max_entries / MIN_SHARD_ENTRIES).clamp(1, MAX_SHARDS);
        Self::with_shards(max_entries, ttl, shards)
    }

    /// A map cut into `shards` shards (at least one) whose capacities add up to `max_entries`.
    fn with_shards(max_entries: usize, ttl: Duration, shards: usize) -> Self {
        let shards = (0..shards)
            .map(|index| {
                let capacity = max_entries / shards + usize::from(index < max_entries % shards);
                Mutex::new(Shard::new(capacity))
            })
            .collect();
        AffinityMap {
            shards,
            pick: RandomState::new(),
            ttl,
            max_entries,
        }
    }

    fn shard(&self, id: &str) -> MutexGuard<'_, Shard<V>> {
        let count = self.shards.len() as u64;
        let index = self.pick.hash_one(id) % count;
        // The index is below the number of shards, which is a usize.
        lock(&self.shards[index as usize])
    }

    /// The value remembered for `id`, unless it has expired at `now` (a monotonic reading); an expired entry is
    /// dropped.
    pub fn get(&self, id: &str, now: Duration) -> Option<V>
    where
        V: Clone,
    {
        self.shard(id).get(id, now)
    }

    /// Remembers `value` for `id` until `ttl` after `now` (a monotonic reading), replacing what was remembered for
    /// it. Expired entries of the id's shard are dropped; if the shard is still full, its oldest insertion is
    /// evicted to make room for a new id (replacing an id evicts nothing).
    pub fn insert(&self, id: &str, value: V, now: Duration) {
        self.shard(id).insert(id, value, now, self.ttl);
    }

    /// Forgets `id`, if it is remembered.
    pub fn remove(&self, id: &str) {
        self.shard(id).remove(id);
    }

    /// Drops every entry expired at `now` (a monotonic reading) and returns how many it dropped. Expired entries
    /// are never returned in any case; sweeping from time to time only gives back their memory sooner.
    pub fn sweep(&self, now: Duration) -> usize {
        self.shards
            .iter()
            .map(|shard| lock(shard).drop_expired(now))
            .sum()
    }

    /// How many entries the map holds, counting expired ones not yet dropped. The shards are counted one after the
    /// other, so with concurrent updates the sum is not a snapshot.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| lock(shard).entries.len())
            .sum()
    }

    /// Whether the map holds no entry at all (expired or not).
    pub fn is_empty(&self) -> bool {
        self.shards
            .iter()
            .all(|shard| lock(shard).entries.is_empty())
    }

    /// The most entries the map holds.
    pub fn max_entries(&self) -> usize {
        self.max_entries
    }
}

impl<V> fmt::Debug for AffinityMap<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AffinityMap")
            .field("len", &self.len())
            .field("max_entries", &self.max_entries)
            .field("shards", &self.shards.len())
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_base::{Clock, ManualClock};
    use std::thread;

    const SEC: Duration = Duration::from_secs(1);
    const NANO: Duration = Duration::from_nanos(1);

    // ----- kinds -----

    #[test]
    fn every_kind_has_a_name_of_its_own() {
        let names: Vec<&str> = OwnedKind::ALL.iter().map(|kind| kind.as_str()).collect();
        assert_eq!(
            names,
            [
                "response",
                "file",
                "batch",
                "vector_store",
                "conversation",
                "chat_completion",
                "fine_tuning_job",
                "assistant",
                "thread",
                "upload",
            ]
        );
    }

    // ----- ids -----

    #[test]
    fn plausible_ids_are_short_and_plain() {
        for id in [
            "resp_67ccd2bed1ec8190b14f964abc0542670bb6a6b452d3795b",
            "file-abc123",
            "assistant-XyZ",
            "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
            "ftjob-0",
            "a",
            "0",
            "v1",
            "name.with.dots",
            "urn:thing:1",
            ".hidden",
            "..x",
        ] {
            assert!(plausible_id(id), "{id}");
        }
        for id in [
            "", ".", "..", "...", "a b", "a/b", "a%20b", "a+b", "a?b", "a#b", "é", "a\u{0}", "a\n",
        ] {
            assert!(!plausible_id(id), "{id:?}");
        }
    }

    #[test]
    fn an_id_may_take_up_to_256_bytes() {
        assert!(plausible_id(&"x".repeat(MAX_ID_LEN)));
        assert!(!plausible_id(&"x".repeat(MAX_ID_LEN + 1)));
        assert_eq!(MAX_ID_LEN, 256);
    }

    // ----- paths -----

    /// Checks that `path` names `(kind, id)`, in both the api-version and the v1 form.
    fn names(path: &str, kind: OwnedKind, id: &str) {
        assert_eq!(owned_id_in_path(path), Some((kind, id)), "{path}");
        let v1 = format!("/v1{path}");
        assert_eq!(owned_id_in_path(&v1), Some((kind, id)), "{v1}");
    }

    /// Checks that `path` names nothing, in both the api-version and the v1 form.
    fn names_nothing(path: &str) {
        assert_eq!(owned_id_in_path(path), None, "{path}");
        let v1 = format!("/v1{path}");
        assert_eq!(owned_id_in_path(&v1), None, "{v1}");
    }

    #[test]
    fn response_paths_name_the_response() {
        use OwnedKind::Response;
        names("/responses/resp_1", Response, "resp_1");
        names("/responses/resp_1/", Response, "resp_1");
        names("/responses/resp_1/input_items", Response, "resp_1");
        names("/responses/resp_1/cancel", Response, "resp_1");
        names("/responses/resp_1?api-version=preview", Response, "resp_1");
        names(
            "/responses/resp_1/input_items?limit=5&after=msg_1",
            Response,
            "resp_1",
        );
    }

    #[test]
    fn file_paths_name_the_file() {
        use OwnedKind::File;
        names("/files/file-1", File, "file-1");
        names("/files/file-1/content", File, "file-1");
        names("/files/assistant-1/content/", File, "assistant-1");
        names("/files/file-1?api-version=2024-10-21", File, "file-1");
    }

    #[test]
    fn batch_paths_name_the_batch() {
        use OwnedKind::Batch;
        names("/batches/batch_1", Batch, "batch_1");
        names("/batches/batch_1/cancel", Batch, "batch_1");
        names("/batches/batch_1/", Batch, "batch_1");
    }

    #[test]
    fn vector_store_paths_name_the_store_even_below_it() {
        use OwnedKind::VectorStore;
        names("/vector_stores/vs_1", VectorStore, "vs_1");
        names("/vector_stores/vs_1/search", VectorStore, "vs_1");
        names("/vector_stores/vs_1/files", VectorStore, "vs_1");
        names("/vector_stores/vs_1/files/file-2", VectorStore, "vs_1");
        names(
            "/vector_stores/vs_1/files/file-2/content",
            VectorStore,
            "vs_1",
        );
        names(
            "/vector_stores/vs_1/file_batches/vsfb_3/cancel",
            VectorStore,
            "vs_1",
        );
        names(
            "/vector_stores/vs_1/file_batches/vsfb_3/files/",
            VectorStore,
            "vs_1",
        );
    }

    #[test]
    fn conversation_paths_name_the_conversation() {
        use OwnedKind::Conversation;
        names("/conversations/conv_1", Conversation, "conv_1");
        names("/conversations/conv_1/items", Conversation, "conv_1");
        names("/conversations/conv_1/items/msg_2", Conversation, "conv_1");
        names("/conversations/conv_1/items/msg_2/", Conversation, "conv_1");
    }

    #[test]
    fn stored_completion_paths_name_the_completion() {
        use OwnedKind::ChatCompletion;
        names("/chat/completions/chatcmpl-1", ChatCompletion, "chatcmpl-1");
        names(
            "/chat/completions/chatcmpl-1/messages",
            ChatCompletion,
            "chatcmpl-1",
        );
        names(
            "/chat/completions/chatcmpl-1/",
            ChatCompletion,
            "chatcmpl-1",
        );
        names(
            "/deployments/gpt-4o/chat/completions/chatcmpl-1",
            ChatCompletion,
            "chatcmpl-1",
        );
        names(
            "/deployments/gpt-4o/chat/completions/chatcmpl-1/messages?api-version=2025-02-01-preview",
            ChatCompletion,
            "chatcmpl-1",
        );
    }

    #[test]
    fn fine_tuning_job_paths_name_the_job() {
        use OwnedKind::FineTuningJob;
        names("/fine_tuning/jobs/ftjob-1", FineTuningJob, "ftjob-1");
        for below in ["events", "checkpoints", "cancel", "pause", "resume"] {
            names(
                &format!("/fine_tuning/jobs/ftjob-1/{below}"),
                FineTuningJob,
                "ftjob-1",
            );
        }
        names("/fine_tuning/jobs/ftjob-1/", FineTuningJob, "ftjob-1");
        names_nothing("/fine_tuning/checkpoints/ft-ckpt-1/permissions");
        names_nothing("/fine_tuning/alpha/graders/run");
        names_nothing("/fine_tuning");
        names_nothing("/fine_tuning/jobs");
    }

    #[test]
    fn assistant_paths_name_the_assistant() {
        use OwnedKind::Assistant;
        names("/assistants/asst_1", Assistant, "asst_1");
        names("/assistants/asst_1/", Assistant, "asst_1");
    }

    #[test]
    fn thread_paths_name_the_thread_of_runs_and_messages() {
        use OwnedKind::Thread;
        names("/threads/thread_1", Thread, "thread_1");
        names("/threads/thread_1/messages", Thread, "thread_1");
        names("/threads/thread_1/messages/msg_2", Thread, "thread_1");
        names("/threads/thread_1/runs", Thread, "thread_1");
        names("/threads/thread_1/runs/run_2", Thread, "thread_1");
        names("/threads/thread_1/runs/run_2/cancel", Thread, "thread_1");
        names(
            "/threads/thread_1/runs/run_2/submit_tool_outputs",
            Thread,
            "thread_1",
        );
        names(
            "/threads/thread_1/runs/run_2/steps/step_3",
            Thread,
            "thread_1",
        );
    }

    #[test]
    fn upload_paths_name_the_upload() {
        use OwnedKind::Upload;
        names("/uploads/upload_1", Upload, "upload_1");
        names("/uploads/upload_1/parts", Upload, "upload_1");
        names("/uploads/upload_1/complete", Upload, "upload_1");
        names("/uploads/upload_1/cancel", Upload, "upload_1");
    }

    #[test]
    fn collections_name_nothing() {
        for path in [
            "/responses",
            "/files",
            "/files/",
            "/batches",
            "/vector_stores",
            "/vector_stores/",
            "/conversations",
            "/chat/completions",
            "/chat/completions/",
            "/chat/completions?api-version=2024-10-21",
            "/deployments/gpt-4o/chat/completions",
            "/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
            "/fine_tuning/jobs",
            "/assistants",
            "/threads",
            "/uploads",
            "/files?after=file-1",
            "/files?purpose=batch/file-1",
        ] {
            names_nothing(path);
        }
    }

    #[test]
    fn calls_beside_the_ids_name_nothing() {
        names_nothing("/responses/input_tokens");
        names_nothing("/responses/compact");
        names_nothing("/threads/runs");
        names_nothing("/threads/runs/run_1");
        // The same words are ids in other families.
        names("/files/runs", OwnedKind::File, "runs");
        names("/threads/compact", OwnedKind::Thread, "compact");
        names(
            "/conversations/input_tokens",
            OwnedKind::Conversation,
            "input_tokens",
        );
    }

    #[test]
    fn other_paths_name_nothing() {
        for path in [
            "",
            "/",
            "/v1",
            "/v1/",
            "/models",
            "/models/gpt-4o",
            "/deployments/gpt-4o/completions",
            "/deployments/gpt-4o/embeddings",
            "/deployments/gpt-4o/chat",
            "/deployments/gpt-4o",
            "/deployments",
            "/chat",
            "/chat/messages/x",
            "/images/generations",
            "/realtime/sessions",
            "/evals/eval_1",
        ] {
            names_nothing(path);
        }
    }

    #[test]
    fn segments_compare_exactly() {
        for path in [
            "/Files/file-1",
            "/FILES/file-1",
            "/V1/files/file-1",
            "/v2/files/file-1",
            "/openai/files/file-1",
            "/openai/v1/files/file-1",
            "/v1/v1/files/file-1",
            "/file/file-1",
            "/responses_/resp_1",
            "/chat/Completions/chatcmpl-1",
            "/Chat/completions/chatcmpl-1",
            "/fine_tuning/Jobs/ftjob-1",
            "/fine-tuning/jobs/ftjob-1",
            "/deployments/gpt-4o/Chat/completions/chatcmpl-1",
            "/deployments/gpt-4o/chat/Completions/chatcmpl-1",
            "/Deployments/gpt-4o/chat/completions/chatcmpl-1",
            "/vector-stores/vs_1",
        ] {
            assert_eq!(owned_id_in_path(path), None, "{path}");
        }
    }

    #[test]
    fn empty_segments_name_nothing() {
        for path in [
            "//files/file-1",
            "/files//file-1",
            "/files//content",
            "/files/file-1//",
            "/files/file-1//content",
            "/v1//files/file-1",
            "//v1/files/file-1",
            "/deployments//chat/completions/chatcmpl-1",
            "/vector_stores/vs_1//files",
            "//",
            "///",
        ] {
            assert_eq!(owned_id_in_path(path), None, "{path}");
        }
    }

    #[test]
    fn implausible_ids_name_nothing() {
        for id in [".", "..", "file%2D1", "a+b", "é", "a:b c"] {
            names_nothing(&format!("/files/{id}"));
            names_nothing(&format!("/files/{id}/content"));
        }
        names("/files/a:b.c-d_e", OwnedKind::File, "a:b.c-d_e");
        let longest = "f".repeat(MAX_ID_LEN);
        names(&format!("/files/{longest}"), OwnedKind::File, &longest);
        names_nothing(&format!("/files/{longest}f"));
    }

    #[test]
    fn the_query_and_fragment_are_ignored() {
        use OwnedKind::File;
        names("/files/file-1?api-version=2024-10-21", File, "file-1");
        names("/files/file-1/?api-version=2024-10-21", File, "file-1");
        names("/files/file-1#top", File, "file-1");
        names("/files/file-1?next=/files/file-2", File, "file-1");
        names("/files/file-1#x?y", File, "file-1");
        names_nothing("/files?id=file-1");
        names_nothing("/files#/file-1");
        names_nothing("?/files/file-1");
    }

    #[test]
    fn a_path_without_its_leading_slash_reads_alike() {
        assert_eq!(
            owned_id_in_path("files/file-1"),
            Some((OwnedKind::File, "file-1"))
        );
        assert_eq!(
            owned_id_in_path("v1/responses/resp_1/cancel"),
            Some((OwnedKind::Response, "resp_1"))
        );
    }

    #[test]
    fn v1_is_only_skipped_at_the_start() {
        names("/files/v1", OwnedKind::File, "v1");
        assert_eq!(
            owned_id_in_path("/files/v1/content"),
            Some((OwnedKind::File, "v1"))
        );
        assert_eq!(owned_id_in_path("/v1"), None);
    }

    // ----- creates -----

    #[test]
    fn posts_to_a_collection_create() {
        use OwnedKind::*;
        for (path, kind) in [
            ("/responses", Response),
            ("/files", File),
            ("/batches", Batch),
            ("/vector_stores", VectorStore),
            ("/conversations", Conversation),
            ("/fine_tuning/jobs", FineTuningJob),
            ("/assistants", Assistant),
            ("/threads", Thread),
            ("/threads/runs", Thread),
            ("/uploads", Upload),
            ("/chat/completions", ChatCompletion),
            ("/deployments/gpt-4o/chat/completions", ChatCompletion),
        ] {
            for form in [
                path.to_owned(),
                format!("/v1{path}"),
                format!("{path}/"),
                format!("{path}?api-version=2025-04-01-preview"),
                format!("/v1{path}/?api-version=preview"),
            ] {
                assert_eq!(creates("POST", &form), Some(kind), "{form}");
            }
        }
    }

    #[test]
    fn the_method_is_post_in_any_case() {
        assert_eq!(creates("post", "/files"), Some(OwnedKind::File));
        assert_eq!(creates("Post", "/v1/responses"), Some(OwnedKind::Response));
        for method in [
            "GET", "get", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "", "POSTS", "POS",
        ] {
            assert_eq!(creates(method, "/files"), None, "{method}");
            assert_eq!(creates(method, "/v1/responses"), None, "{method}");
        }
    }

    #[test]
    fn calls_below_an_object_create_nothing() {
        for path in [
            "/responses/resp_1",
            "/responses/resp_1/cancel",
            "/responses/input_tokens",
            "/responses/compact",
            "/responses/runs",
            "/files/file-1",
            "/files/file-1/content",
            "/files/runs",
            "/batches/batch_1/cancel",
            "/vector_stores/vs_1/files",
            "/vector_stores/vs_1/file_batches",
            "/conversations/conv_1/items",
            "/chat/completions/chatcmpl-1",
            "/fine_tuning/jobs/ftjob-1/cancel",
            "/assistants/asst_1",
            "/threads/thread_1/runs",
            "/threads/thread_1/messages",
            "/threads/runs/run_1",
            "/threads/runs/runs",
            "/uploads/upload_1/parts",
            "/uploads/upload_1/complete",
            "/deployments/gpt-4o/chat/completions/chatcmpl-1",
        ] {
            assert_eq!(creates("POST", path), None, "{path}");
            assert_eq!(creates("POST", &format!("/v1{path}")), None, "/v1{path}");
        }
    }

    #[test]
    fn other_posts_create_nothing() {
        for path in [
            "",
            "/",
            "/v1",
            "/models",
            "/embeddings",
            "/completions",
            "/deployments/gpt-4o/completions",
            "/deployments/gpt-4o/embeddings",
            "/deployments/gpt-4o/responses",
            "/deployments/gpt-4o",
            "/images/generations",
            "/audio/speech",
            "/fine_tuning",
            "/fine_tuning/checkpoints",
            "/chat",
            "/Files",
            "/v1/Responses",
            "/V1/files",
            "/files//",
            "//files",
            "/openai/files",
        ] {
            assert_eq!(creates("POST", path), None, "{path}");
        }
    }

    #[test]
    fn storing_takes_a_literal_true() {
        assert!(asks_to_store(br#"{"store": true}"#));
        assert!(asks_to_store(br#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"store":true,"metadata":{"a":"b"}}"#));
        assert!(asks_to_store(b" \n\t{\"store\":true}"));
        for body in [
            &br#"{"store": false}"#[..],
            br#"{"model": "gpt-4o"}"#,
            br#"{}"#,
            br#"{"store": null}"#,
            br#"{"store": "true"}"#,
            br#"{"store": 1}"#,
            br#"{"metadata": {"store": true}}"#,
            br#"[true]"#,
            br#"true"#,
            br#"{"store": true"#,
            br#"{"store": true} trailing"#,
            b"",
            b"store=true",
        ] {
            assert!(!asks_to_store(body), "{}", String::from_utf8_lossy(body));
        }
    }

    // ----- bodies -----

    fn ids(body: &str) -> Vec<(OwnedKind, String)> {
        owned_ids_in_body(body.as_bytes())
    }

    fn pairs(expected: &[(OwnedKind, &str)]) -> Vec<(OwnedKind, String)> {
        expected
            .iter()
            .map(|(kind, id)| (*kind, (*id).to_owned()))
            .collect()
    }

    #[test]
    fn each_field_names_its_kind() {
        use OwnedKind::*;
        for (body, kind, id) in [
            (r#"{"previous_response_id": "resp_1"}"#, Response, "resp_1"),
            (r#"{"conversation": "conv_1"}"#, Conversation, "conv_1"),
            (
                r#"{"conversation": {"id": "conv_1"}}"#,
                Conversation,
                "conv_1",
            ),
            (r#"{"thread_id": "thread_1"}"#, Thread, "thread_1"),
            (r#"{"assistant_id": "asst_1"}"#, Assistant, "asst_1"),
            (r#"{"input_file_id": "file-1"}"#, File, "file-1"),
            (r#"{"training_file": "file-1"}"#, File, "file-1"),
            (r#"{"validation_file": "file-1"}"#, File, "file-1"),
            (r#"{"file_id": "file-1"}"#, File, "file-1"),
            (r#"{"file_ids": ["file-1"]}"#, File, "file-1"),
            (
                r#"{"tools": [{"type": "file_search", "vector_store_ids": ["vs_1"]}]}"#,
                VectorStore,
                "vs_1",
            ),
            (
                r#"{"tool_resources": {"code_interpreter": {"file_ids": ["file-1"]}}}"#,
                File,
                "file-1",
            ),
            (
                r#"{"tool_resources": {"file_search": {"vector_store_ids": ["vs_1"]}}}"#,
                VectorStore,
                "vs_1",
            ),
        ] {
            assert_eq!(ids(body), pairs(&[(kind, id)]), "{body}");
        }
    }

    #[test]
    fn a_responses_call_names_its_predecessor_and_stores() {
        let body = r#"{
            "model": "gpt-4.1",
            "input": [{"role": "user", "content": [{"type": "input_text", "text": "and then?"}]}],
            "previous_response_id": "resp_abc",
            "tools": [
                {"type": "function", "name": "f", "parameters": {"type": "object"}},
                {"type": "file_search", "vector_store_ids": ["vs_a", "vs_b"], "max_num_results": 5},
                {"type": "file_search", "vector_store_ids": ["vs_c"]}
            ],
            "store": true,
            "stream": true
        }"#;
        assert_eq!(
            ids(body),
            pairs(&[
                (OwnedKind::Response, "resp_abc"),
                (OwnedKind::VectorStore, "vs_a"),
                (OwnedKind::VectorStore, "vs_b"),
                (OwnedKind::VectorStore, "vs_c"),
            ])
        );
    }

    #[test]
    fn a_conversation_is_an_id_or_an_object_holding_one() {
        let conversation = |id: &str| pairs(&[(OwnedKind::Conversation, id)]);
        assert_eq!(ids(r#"{"conversation": "conv_1"}"#), conversation("conv_1"));
        assert_eq!(
            ids(r#"{"conversation": {"id": "conv_2", "extra": [1, {"x": null}]}}"#),
            conversation("conv_2")
        );
        assert_eq!(ids(r#"{"conversation": {}}"#), []);
        assert_eq!(ids(r#"{"conversation": {"id": null}}"#), []);
        assert_eq!(ids(r#"{"conversation": null}"#), []);
        assert_eq!(ids(r#"{"conversation": {"id": 7}}"#), []);
        assert_eq!(
            ids(r#"{"conversation": 7, "previous_response_id": "resp_1"}"#),
            []
        );
    }

    #[test]
    fn fields_are_reported_in_a_fixed_order() {
        use OwnedKind::*;
        let body = r#"{
            "tool_resources": {
                "file_search": {"vector_store_ids": ["vs_r"]},
                "code_interpreter": {"file_ids": ["file-r1", "file-r2"]}
            },
            "tools": [{"vector_store_ids": ["vs_t"]}],
            "file_ids": ["file-a", "file-b"],
            "file_id": "file-f",
            "validation_file": "file-v",
            "training_file": "file-t",
            "input_file_id": "file-i",
            "assistant_id": "asst_1",
            "thread_id": "thread_1",
            "conversation": {"id": "conv_1"},
            "previous_response_id": "resp_1"
        }"#;
        assert_eq!(
            ids(body),
            pairs(&[
                (Response, "resp_1"),
                (Conversation, "conv_1"),
                (Thread, "thread_1"),
                (Assistant, "asst_1"),
                (File, "file-i"),
                (File, "file-t"),
                (File, "file-v"),
                (File, "file-f"),
                (File, "file-a"),
                (File, "file-b"),
                (VectorStore, "vs_t"),
                (File, "file-r1"),
                (File, "file-r2"),
                (VectorStore, "vs_r"),
            ])
        );
    }

    #[test]
    fn each_id_of_a_kind_is_reported_once() {
        use OwnedKind::*;
        let body = r#"{
            "training_file": "file-1",
            "validation_file": "file-1",
            "file_ids": ["file-1", "file-2", "file-2"],
            "thread_id": "same",
            "assistant_id": "same",
            "tools": [{"vector_store_ids": ["vs_1"]}, {"vector_store_ids": ["vs_1"]}]
        }"#;
        assert_eq!(
            ids(body),
            pairs(&[
                (Thread, "same"),
                (Assistant, "same"),
                (File, "file-1"),
                (File, "file-2"),
                (VectorStore, "vs_1"),
            ])
        );
    }

    #[test]
    fn at_most_sixteen_ids_are_reported() {
        assert_eq!(MAX_IDS_IN_BODY, 16);
        let files: Vec<String> = (0..40).map(|n| format!("\"file-{n}\"")).collect();
        let body = format!(
            r#"{{"previous_response_id": "resp_1", "file_ids": [{}], "tools": [{{"vector_store_ids": ["vs_1"]}}]}}"#,
            files.join(",")
        );
        let found = ids(&body);
        let mut expected = vec![(OwnedKind::Response, "resp_1".to_owned())];
        expected.extend((0..15).map(|n| (OwnedKind::File, format!("file-{n}"))));
        assert_eq!(found, expected);
    }

    #[test]
    fn repeats_and_implausible_ids_do_not_use_up_the_bound() {
        let mut entries = vec!["\"file-0\"".to_owned(); 30];
        entries.extend((0..30).map(|_| "\"bad id\"".to_owned()));
        entries.push("\"\"".to_owned());
        entries.push(format!("\"{}\"", "x".repeat(MAX_ID_LEN + 1)));
        entries.extend((1..20).map(|n| format!("\"file-{n}\"")));
        let body = format!(r#"{{"file_ids": [{}]}}"#, entries.join(","));
        let found = ids(&body);
        let expected: Vec<_> = (0..16)
            .map(|n| (OwnedKind::File, format!("file-{n}")))
            .collect();
        assert_eq!(found, expected);
    }

    #[test]
    fn implausible_ids_are_skipped() {
        assert_eq!(
            ids(
                r#"{"previous_response_id": "", "file_id": "a/b", "thread_id": "..", "assistant_id": "asst_1"}"#
            ),
            pairs(&[(OwnedKind::Assistant, "asst_1")])
        );
        let longest = "r".repeat(MAX_ID_LEN);
        assert_eq!(
            ids(&format!(r#"{{"previous_response_id": "{longest}"}}"#)),
            pairs(&[(OwnedKind::Response, &longest)])
        );
        assert_eq!(
            ids(&format!(r#"{{"previous_response_id": "{longest}r"}}"#)),
            []
        );
    }

    #[test]
    fn escaped_strings_are_read_unescaped() {
        assert_eq!(
            ids(r#"{"previous_response_id": "resp\u005f1", "file_ids": ["file\u002D2"]}"#),
            pairs(&[(OwnedKind::Response, "resp_1"), (OwnedKind::File, "file-2")])
        );
        // An escape that leaves an implausible id is still refused.
        assert_eq!(ids(r#"{"file_id": "file\n1"}"#), []);
    }

    #[test]
    fn null_fields_are_absent() {
        let body = r#"{
            "previous_response_id": null, "conversation": null, "thread_id": null, "assistant_id": null,
            "input_file_id": null, "training_file": null, "validation_file": null, "file_id": null,
            "file_ids": null, "tools": null, "tool_resources": null
        }"#;
        assert_eq!(ids(body), []);
        assert_eq!(
            ids(
                r#"{"tools": [{"vector_store_ids": null}, {}], "tool_resources": {"code_interpreter": null, "file_search": {}}}"#
            ),
            []
        );
        assert_eq!(
            ids(
                r#"{"tool_resources": {"code_interpreter": {"file_ids": null}, "file_search": {"vector_store_ids": null}}}"#
            ),
            []
        );
    }

    #[test]
    fn other_fields_are_ignored() {
        let body = r#"{
            "model": "gpt-4o",
            "messages": [{"role": "user", "content": [{"type": "file", "file": {"file_id": "file-nested"}}]}],
            "metadata": {"previous_response_id": "resp_meta", "thread_id": "thread_meta"},
            "response_format": {"type": "json_schema", "json_schema": {"schema": {"properties": {"file_id": {"type": "string"}}}}},
            "n": 1, "temperature": 0.5, "stop": null, "logit_bias": {"50256": -100},
            "id": "resp_self", "object": "response", "input_file": "file-no", "files": ["file-no"],
            "file_id": "file-top"
        }"#;
        assert_eq!(ids(body), pairs(&[(OwnedKind::File, "file-top")]));
    }

    #[test]
    fn a_body_that_is_not_a_json_object_names_nothing() {
        for body in [
            &b""[..],
            b" ",
            b"{",
            b"}",
            b"not json",
            b"null",
            b"5",
            b"\"resp_1\"",
            br#"["resp_1"]"#,
            br#"[{"previous_response_id": "resp_1"}]"#,
            br#"{"previous_response_id": "resp_1""#,
            br#"{"previous_response_id": "resp_1"} {"#,
            br#"{"previous_response_id": "resp_1",}"#,
            b"\xef\xbb\xbf{\"previous_response_id\": \"resp_1\"}",
            b"--boundary\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n",
            b"{\"previous_response_id\": \"resp_\xff\"}",
        ] {
            assert_eq!(
                owned_ids_in_body(body),
                [],
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        assert_eq!(
            owned_ids_in_body(b"\r\n\t {\"previous_response_id\": \"resp_1\"} \n"),
            pairs(&[(OwnedKind::Response, "resp_1")])
        );
    }

    #[test]
    fn a_field_of_another_shape_voids_the_body() {
        for body in [
            r#"{"previous_response_id": 5, "file_id": "file-1"}"#,
            r#"{"previous_response_id": ["resp_1"], "file_id": "file-1"}"#,
            r#"{"file_ids": "file-2", "file_id": "file-1"}"#,
            r#"{"file_ids": [5], "file_id": "file-1"}"#,
            r#"{"tools": {"vector_store_ids": ["vs_1"]}, "file_id": "file-1"}"#,
            r#"{"tools": ["file_search"], "file_id": "file-1"}"#,
            r#"{"tool_resources": [], "file_id": "file-1"}"#,
            r#"{"file_id": "file-1", "file_id": "file-2"}"#,
        ] {
            assert_eq!(ids(body), [], "{body}");
        }
    }

    #[test]
    fn an_id_must_be_a_json_string() {
        let refused = serde_json::from_str::<Text<'_>>("5")
            .err()
            .map(|error| error.to_string());
        assert_eq!(
            refused.as_deref(),
            Some("invalid type: integer `5`, expected an id string at line 1 column 1")
        );
        let borrowed = serde_json::from_str::<Text<'_>>("\"resp_1\"").map(|text| text.0);
        assert!(matches!(borrowed, Ok(Cow::Borrowed("resp_1"))));
        let unescaped = serde_json::from_str::<Text<'_>>("\"resp\\u005f1\"").map(|text| text.0);
        assert!(matches!(unescaped, Ok(Cow::Owned(id)) if id == "resp_1"));
    }

    // ----- the map -----

    /// The sizes of a map's shards.
    fn shard_lens<V>(map: &AffinityMap<V>) -> Vec<usize> {
        map.shards
            .iter()
            .map(|shard| lock(shard).entries.len())
            .collect()
    }

    fn capacities<V>(map: &AffinityMap<V>) -> Vec<usize> {
        map.shards
            .iter()
            .map(|shard| lock(shard).capacity)
            .collect()
    }

    fn order_len<V>(map: &AffinityMap<V>) -> usize {
        map.shards.iter().map(|shard| lock(shard).order.len()).sum()
    }

    #[test]
    fn an_entry_lives_until_its_ttl_has_passed() {
        let map = AffinityMap::new(10, 5 * SEC);
        map.insert("resp_1", "east", 10 * SEC);
        assert_eq!(map.get("resp_1", 10 * SEC), Some("east"));
        assert_eq!(map.get("resp_1", 15 * SEC - NANO), Some("east"));
        assert_eq!(map.len(), 1);
        assert_eq!(map.get("resp_1", 15 * SEC), None);
        assert_eq!(map.len(), 0, "reading an expired entry drops it");
        assert_eq!(map.get("resp_1", 10 * SEC), None, "and it stays gone");
        assert_eq!(map.get("other", 10 * SEC), None);
    }

    #[test]
    fn reading_does_not_extend_a_life() {
        let map = AffinityMap::new(10, 5 * SEC);
        map.insert("a", 1, Duration::ZERO);
        assert_eq!(map.get("a", 4 * SEC), Some(1));
        assert_eq!(map.get("a", 5 * SEC), None);
    }

    #[test]
    fn reading_an_expired_entry_drops_the_older_ones_too() {
        let map = AffinityMap::new(10, 5 * SEC);
        map.insert("a", 1, Duration::ZERO);
        map.insert("b", 2, SEC);
        map.insert("c", 3, 2 * SEC);
        assert_eq!(map.get("b", 6 * SEC), None);
        assert_eq!(map.len(), 1);
        assert_eq!(map.get("c", 6 * SEC), Some(3));
    }

    #[test]
    fn a_ttl_past_the_end_of_time_saturates() {
        let map = AffinityMap::new(10, Duration::MAX);
        map.insert("a", 1, 5 * SEC);
        assert_eq!(map.get("a", Duration::MAX - NANO), Some(1));
        assert_eq!(map.get("a", Duration::MAX), None);
    }

    #[test]
    fn a_zero_ttl_keeps_nothing_readable() {
        let map = AffinityMap::new(10, Duration::ZERO);
        map.insert("a", 1, 5 * SEC);
        assert_eq!(map.get("a", 5 * SEC), None);
    }

    #[test]
    fn inserting_again_replaces_the_value_and_renews_the_life() {
        let map = AffinityMap::new(10, 5 * SEC);
        map.insert("a", "east", Duration::ZERO);
        map.insert("b", "east", Duration::ZERO);
        map.insert("a", "west", 3 * SEC);
        assert_eq!(map.len(), 2);
        assert_eq!(map.get("a", 3 * SEC), Some("west"));
        assert_eq!(map.get("b", 4 * SEC), Some("east"));
        assert_eq!(map.get("b", 5 * SEC), None);
        assert_eq!(map.get("a", 8 * SEC - NANO), Some("west"));
        assert_eq!(map.get("a", 8 * SEC), None);
        assert!(map.is_empty());
    }

    #[test]
    fn a_full_map_evicts_its_oldest_insertion() {
        let map = AffinityMap::new(3, 100 * SEC);
        for (n, id) in ["a", "b", "c"].into_iter().enumerate() {
            map.insert(id, n, Duration::ZERO);
        }
        map.insert("d", 3, SEC);
        assert_eq!(map.len(), 3);
        assert_eq!(map.get("a", SEC), None);
        // Inserting "b" again makes it the latest insertion, so "c" goes next.
        map.insert("b", 10, 2 * SEC);
        map.insert("e", 4, 3 * SEC);
        assert_eq!(map.len(), 3);
        assert_eq!(map.get("c", 3 * SEC), None);
        assert_eq!(map.get("b", 3 * SEC), Some(10));
        assert_eq!(map.get("d", 3 * SEC), Some(3));
        assert_eq!(map.get("e", 3 * SEC), Some(4));
        map.insert("f", 5, 4 * SEC);
        assert_eq!(map.get("d", 4 * SEC), None);
        assert_eq!(map.get("b", 4 * SEC), Some(10));
    }

    #[test]
    fn a_removed_entry_is_not_evicted_twice() {
        let map = AffinityMap::new(2, 100 * SEC);
        map.insert("a", 1, Duration::ZERO);
        map.insert("b", 2, Duration::ZERO);
        map.remove("a");
        map.insert("a", 3, SEC);
        // "b" is now the oldest; the place "a" left behind must not count for the new "a".
        map.insert("c", 4, 2 * SEC);
        assert_eq!(map.get("b", 2 * SEC), None);
        assert_eq!(map.get("a", 2 * SEC), Some(3));
        assert_eq!(map.get("c", 2 * SEC), Some(4));
    }

    #[test]
    fn replacing_in_a_full_map_evicts_nothing() {
        let map = AffinityMap::new(3, 100 * SEC);
        for id in ["a", "b", "c"] {
            map.insert(id, 0, Duration::ZERO);
        }
        map.insert("a", 1, SEC);
        map.insert("c", 2, SEC);
        assert_eq!(map.len(), 3);
        for (id, value) in [("a", 1), ("b", 0), ("c", 2)] {
            assert_eq!(map.get(id, SEC), Some(value), "{id}");
        }
    }

    #[test]
    fn replacing_in_a_map_with_room_evicts_nothing() {
        let map = AffinityMap::new(3, 100 * SEC);
        map.insert("a", 0, Duration::ZERO);
        map.insert("b", 0, Duration::ZERO);
        map.insert("b", 1, SEC);
        assert_eq!(map.len(), 2);
        assert_eq!(map.get("a", SEC), Some(0));
        assert_eq!(map.get("b", SEC), Some(1));
    }

    #[test]
    fn expired_entries_make_room_before_live_ones_are_evicted() {
        let map = AffinityMap::new(3, 10 * SEC);
        map.insert("a", 1, Duration::ZERO);
        map.insert("b", 2, SEC);
        map.insert("c", 3, 5 * SEC);
        // At 11s "a" and "b" have expired: both go, and "c" stays although the map was full.
        map.insert("d", 4, 11 * SEC);
        assert_eq!(map.len(), 2);
        assert_eq!(map.get("c", 11 * SEC), Some(3));
        assert_eq!(map.get("d", 11 * SEC), Some(4));
    }

    #[test]
    fn inserting_drops_expired_entries_even_with_room_to_spare() {
        let map = AffinityMap::new(10, 10 * SEC);
        map.insert("a", 1, Duration::ZERO);
        map.insert("b", 2, SEC);
        map.insert("c", 3, 10 * SEC);
        assert_eq!(map.len(), 2, "\"a\" expired at 10s, exactly");
        assert_eq!(map.get("b", 10 * SEC), Some(2));
    }

    #[test]
    fn an_expiry_never_precedes_that_of_an_earlier_insertion() {
        let map = AffinityMap::new(10, 5 * SEC);
        map.insert("a", 1, 10 * SEC);
        // A reading from a thread that fell behind: "b" lives as long as "a" does.
        map.insert("b", 2, 8 * SEC);
        assert_eq!(map.get("b", 14 * SEC), Some(2));
        assert_eq!(map.get("b", 15 * SEC), None);
        assert_eq!(map.len(), 0);
        // Later insertions that come in order get their own expiry again.
        map.insert("c", 3, 20 * SEC);
        assert_eq!(map.get("c", 25 * SEC - NANO), Some(3));
        assert_eq!(map.get("c", 25 * SEC), None);
    }

    #[test]
    fn sweeping_drops_what_has_expired() {
        let map = AffinityMap::new(100, 10 * SEC);
        for n in 0..5u32 {
            map.insert(&format!("id-{n}"), n, Duration::from_secs(n.into()));
        }
        assert_eq!(map.sweep(10 * SEC - NANO), 0);
        assert_eq!(map.sweep(10 * SEC), 1);
        assert_eq!(map.len(), 4);
        assert_eq!(map.sweep(12 * SEC + NANO), 2);
        assert_eq!(map.len(), 2);
        assert_eq!(map.sweep(12 * SEC + NANO), 0);
        assert_eq!(map.sweep(100 * SEC), 2);
        assert!(map.is_empty());
        assert_eq!(order_len(&map), 0);
    }

    #[test]
    fn sweeping_covers_every_shard() {
        let map = AffinityMap::new(16_384, 10 * SEC);
        assert_eq!(map.shards.len(), 16);
        for n in 0..600 {
            map.insert(&format!("id-{n}"), n, SEC);
        }
        for n in 600..1000 {
            map.insert(&format!("id-{n}"), n, 5 * SEC);
        }
        assert_eq!(map.len(), 1000);
        assert_eq!(map.sweep(11 * SEC), 600);
        assert_eq!(map.len(), 400);
        assert_eq!(map.sweep(15 * SEC), 400);
        assert!(map.is_empty());
    }

    #[test]
    fn sweeping_skips_the_places_left_by_replacements() {
        let map = AffinityMap::new(10, 10 * SEC);
        map.insert("a", 1, Duration::ZERO);
        map.insert("b", 2, Duration::ZERO);
        map.insert("a", 3, 5 * SEC);
        assert_eq!(map.sweep(10 * SEC), 1);
        assert_eq!(map.get("a", 10 * SEC), Some(3));
        assert_eq!(order_len(&map), 1);
    }

    #[test]
    fn removing_forgets_an_id() {
        let map = AffinityMap::new(10, 10 * SEC);
        map.insert("a", 1, Duration::ZERO);
        map.insert("b", 2, Duration::ZERO);
        map.remove("a");
        map.remove("missing");
        assert_eq!(map.get("a", SEC), None);
        assert_eq!(map.get("b", SEC), Some(2));
        assert_eq!(map.len(), 1);
        map.remove("b");
        assert!(map.is_empty());
        assert_eq!(
            map.sweep(100 * SEC),
            0,
            "removed entries are not swept again"
        );
    }

    #[test]
    fn len_and_is_empty_count_every_shard() {
        let map = AffinityMap::new(1024, 10 * SEC);
        assert!(map.is_empty());
        assert_eq!(map.len(), 0);
        for n in 0..100 {
            map.insert(&format!("id-{n}"), n, Duration::ZERO);
            assert!(!map.is_empty());
        }
        assert_eq!(map.len(), 100);
        assert_eq!(shard_lens(&map).iter().filter(|len| **len > 0).count(), 16);
        for n in 0..100 {
            map.remove(&format!("id-{n}"));
        }
        assert!(map.is_empty());
        // Expired entries still count until they are dropped.
        map.insert("late", 0, Duration::ZERO);
        assert_eq!(map.len(), 1);
        assert!(!map.is_empty());
    }

    #[test]
    fn a_map_for_no_entries_holds_nothing() {
        let map = AffinityMap::new(0, 10 * SEC);
        map.insert("a", 1, Duration::ZERO);
        assert_eq!(map.get("a", Duration::ZERO), None);
        assert!(map.is_empty());
        assert_eq!(map.max_entries(), 0);
    }

    #[test]
    fn a_map_for_one_entry_keeps_the_latest() {
        let map = AffinityMap::new(1, 10 * SEC);
        map.insert("a", 1, Duration::ZERO);
        map.insert("b", 2, Duration::ZERO);
        assert_eq!(map.len(), 1);
        assert_eq!(map.get("b", Duration::ZERO), Some(2));
        assert_eq!(map.max_entries(), 1);
    }

    #[test]
    fn larger_maps_have_more_shards() {
        for (max, shards) in [
            (0, 1),
            (1, 1),
            (63, 1),
            (64, 1),
            (127, 1),
            (128, 2),
            (191, 2),
            (192, 3),
            (1000, 15),
            (1023, 15),
            (1024, 16),
            (100_000, 16),
            (usize::MAX, 16),
        ] {
            let map = AffinityMap::<u8>::new(max, SEC);
            assert_eq!(map.shards.len(), shards, "{max}");
            assert_eq!(capacities(&map).iter().sum::<usize>(), max, "{max}");
            assert_eq!(map.max_entries(), max);
        }
    }

    #[test]
    fn shard_capacities_add_up_to_the_bound() {
        let map = AffinityMap::<u8>::with_shards(20, SEC, 16);
        assert_eq!(
            capacities(&map),
            [2, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]
        );
        let map = AffinityMap::<u8>::with_shards(35, SEC, 16);
        assert_eq!(
            capacities(&map),
            [3, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2]
        );
        let map = AffinityMap::<u8>::with_shards(5, SEC, 16);
        assert_eq!(
            capacities(&map),
            [1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
        let map = AffinityMap::<u8>::with_shards(1030, SEC, 16);
        assert_eq!(capacities(&map)[..6], [65; 6]);
        assert_eq!(capacities(&map)[6..], [64; 10]);
    }

    #[test]
    fn the_bound_holds_across_shards() {
        let map = AffinityMap::with_shards(20, 100 * SEC, 16);
        let caps = capacities(&map);
        for n in 0..1000 {
            map.insert(&format!("id-{n}"), n, Duration::from_millis(n));
            assert!(map.len() <= 20);
            for (len, cap) in shard_lens(&map).iter().zip(&caps) {
                assert!(len <= cap);
            }
        }
        // Every shard has been offered far more than its room.
        assert_eq!(map.len(), 20);
        assert_eq!(shard_lens(&map), caps);
        // The latest insertion is always still there.
        assert_eq!(map.get("id-999", SEC), Some(999));
    }

    #[test]
    fn a_large_map_holds_what_it_was_given() {
        let map = AffinityMap::new(4096, 100 * SEC);
        for n in 0..3000 {
            map.insert(&format!("id-{n}"), n, Duration::ZERO);
        }
        assert_eq!(map.len(), 3000);
        for n in 0..3000 {
            assert_eq!(map.get(&format!("id-{n}"), SEC), Some(n));
        }
    }

    #[test]
    fn outdated_places_are_compacted_past_twice_the_entries_and_slack() {
        let map = AffinityMap::new(10, 100 * SEC);
        for id in ["a", "b", "c"] {
            map.insert(id, 0, Duration::ZERO);
        }
        // Three entries: the order may hold up to 2 * 3 + 16 = 22 places.
        for n in 1..=19 {
            map.insert("b", n, Duration::ZERO);
        }
        assert_eq!(order_len(&map), 22);
        map.insert("b", 20, Duration::ZERO);
        assert_eq!(order_len(&map), 3);
        assert_eq!(map.len(), 3);
        // The live places survive the compaction, in order: "a" is still the oldest.
        for id in ["d", "e", "f", "g", "h", "i", "j"] {
            map.insert(id, 0, Duration::ZERO);
        }
        map.insert("k", 0, Duration::ZERO);
        assert_eq!(map.get("a", Duration::ZERO), None);
        assert_eq!(map.get("c", Duration::ZERO), Some(0));
        assert_eq!(map.get("b", Duration::ZERO), Some(20));
    }

    #[test]
    fn removals_do_not_grow_the_order_without_bound() {
        let map = AffinityMap::new(10, 100 * SEC);
        map.insert("keep", 0, Duration::ZERO);
        for n in 0..1000 {
            map.insert("gone", n, Duration::ZERO);
            map.remove("gone");
            assert!(order_len(&map) <= 2 + STALE_SLACK + 1);
        }
        assert_eq!(map.len(), 1);
        // Removing leaves a place behind until the compaction: 1 entry allows 2 * 1 + 16 = 18 places.
        let map = AffinityMap::new(10, 100 * SEC);
        map.insert("keep", 0, Duration::ZERO);
        for n in 0..17 {
            map.insert(&format!("gone-{n}"), n, Duration::ZERO);
            map.remove(&format!("gone-{n}"));
        }
        assert_eq!(order_len(&map), 18);
        map.insert("gone-17", 0, Duration::ZERO);
        map.remove("gone-17");
        assert_eq!(order_len(&map), 1);
    }

    #[test]
    fn usable_from_many_threads() {
        let map = AffinityMap::new(100_000, 100 * SEC);
        thread::scope(|scope| {
            for worker in 0..4u32 {
                let map = &map;
                scope.spawn(move || {
                    for n in 0..2000u32 {
                        let id = format!("w{worker}-{n}");
                        map.insert(&id, (worker, n), Duration::from_millis(n.into()));
                        assert_eq!(
                            map.get(&id, Duration::from_millis(n.into())),
                            Some((worker, n))
                        );
                        if n % 3 == 0 {
                            map.remove(&id);
                        }
                    }
                });
            }
        });
        assert_eq!(map.len(), 4 * (2000 - 667));
        for worker in 0..4u32 {
            for n in 0..2000u32 {
                let expected = (n % 3 != 0).then_some((worker, n));
                assert_eq!(map.get(&format!("w{worker}-{n}"), 50 * SEC), expected);
            }
        }
    }

    #[test]
    fn the_bound_holds_under_contention() {
        let map = AffinityMap::new(256, 100 * SEC);
        thread::scope(|scope| {
            for worker in 0..4u32 {
                let map = &map;
                scope.spawn(move || {
                    for n in 0..5000u32 {
                        map.insert(
                            &format!("w{worker}-{n}"),
                            n,
                            Duration::from_micros(n.into()),
                        );
                        if n % 100 == 0 {
                            assert!(map.len() <= 256);
                        }
                    }
                });
            }
            scope.spawn(|| {
                for _ in 0..200 {
                    assert!(map.len() <= 256);
                    map.sweep(Duration::ZERO);
                }
            });
        });
        assert_eq!(map.len(), 256);
        let caps = capacities(&map);
        assert_eq!(shard_lens(&map), caps);
        for shard in map.shards.iter() {
            let shard = lock(shard);
            assert_eq!(
                shard.order.len(),
                shard.entries.len(),
                "nothing was replaced"
            );
        }
    }

    #[test]
    fn driven_by_a_manual_clock() {
        let clock = ManualClock::from_millis(0);
        let map = AffinityMap::new(10, 30 * SEC);
        map.insert("resp_1", "east", clock.monotonic());
        clock.advance(29 * SEC);
        assert_eq!(map.get("resp_1", clock.monotonic()), Some("east"));
        clock.advance(SEC);
        assert_eq!(map.get("resp_1", clock.monotonic()), None);
    }

    #[test]
    fn a_poisoned_lock_is_taken_over() {
        let map = std::sync::Arc::new(AffinityMap::new(10, 10 * SEC));
        map.insert("a", 1, Duration::ZERO);
        let holder = map.clone();
        let panicked = thread::spawn(move || {
            let _guard = holder.shards[0].lock();
            panic!("poison the shard's lock");
        })
        .join();
        assert!(panicked.is_err());
        assert!(map.shards[0].is_poisoned());
        assert_eq!(map.get("a", SEC), Some(1));
        map.insert("b", 2, SEC);
        assert_eq!(map.len(), 2);
        map.remove("a");
        assert_eq!(map.sweep(20 * SEC), 1);
        assert!(map.is_empty());
    }

    #[test]
    fn debug_shows_the_size_and_not_the_values() {
        let map = AffinityMap::new(300, 10 * SEC);
        map.insert("a", "secret", Duration::ZERO);
        map.insert("b", "secret", Duration::ZERO);
        assert_eq!(
            format!("{map:?}"),
            "AffinityMap { len: 2, max_entries: 300, shards: 4, ttl: 10s, .. }"
        );
    }
}
