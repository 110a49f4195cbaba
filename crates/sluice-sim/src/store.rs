//! Bounded per-region object stores (stored responses, files, batches).
//!
//! Load tests create objects without ever deleting them, so every store has a cap on the
//! number of objects and on their total size (a rough byte weight given by the caller). When
//! an insert would exceed either cap, the oldest objects are dropped first.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use serde_json::{Value, json};
use uuid::Uuid;

use crate::resources::StoredFile;
use crate::responses::StoredResponse;
use crate::server::query_param;

/// Most objects of one kind kept per region.
pub(crate) const MAX_OBJECTS: usize = 10_000;
/// Most bytes of uploaded file content kept per region.
pub(crate) const MAX_FILE_BYTES: usize = 256 * 1024 * 1024;
/// Most bytes (roughly: serialized JSON) of stored responses kept per region.
pub(crate) const MAX_RESPONSE_BYTES: usize = 256 * 1024 * 1024;
/// Batches are small; their weight is not tracked beyond the count.
const MAX_BATCH_BYTES: usize = usize::MAX;

/// `prefix` followed by 32 lowercase hex digits (a random v4 UUID without dashes).
pub(crate) fn new_id(prefix: &str) -> String {
    format!("{prefix}{}", Uuid::new_v4().simple())
}

struct Slot<T> {
    seq: u64,
    weight: usize,
    value: T,
}

/// A map from id to object that remembers insertion order and drops the oldest objects when
/// it holds more than `max_items` objects or more than `max_weight` in total weight.
pub(crate) struct BoundedStore<T> {
    max_items: usize,
    max_weight: usize,
    next_seq: u64,
    /// Insertion sequence number → id, oldest first.
    order: BTreeMap<u64, String>,
    slots: HashMap<String, Slot<T>>,
    weight: usize,
}

impl<T> BoundedStore<T> {
    pub(crate) fn new(max_items: usize, max_weight: usize) -> Self {
        BoundedStore {
            max_items: max_items.max(1),
            max_weight,
            next_seq: 0,
            order: BTreeMap::new(),
            slots: HashMap::new(),
            weight: 0,
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }

    /// Total weight of the objects held.
    #[cfg(test)]
    pub(crate) fn weight(&self) -> usize {
        self.weight
    }

    /// Add (or replace) `id`, as the newest object. Older objects are dropped until the new
    /// one fits; an object heavier than the whole budget is still kept, alone.
    pub(crate) fn insert(&mut self, id: String, value: T, weight: usize) {
        self.remove(&id);
        while !self.slots.is_empty()
            && (self.slots.len() >= self.max_items
                || self.weight.saturating_add(weight) > self.max_weight)
        {
            self.drop_oldest();
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.order.insert(seq, id.clone());
        self.weight = self.weight.saturating_add(weight);
        self.slots.insert(id, Slot { seq, weight, value });
    }

    pub(crate) fn get(&self, id: &str) -> Option<&T> {
        self.slots.get(id).map(|s| &s.value)
    }

    pub(crate) fn get_mut(&mut self, id: &str) -> Option<&mut T> {
        self.slots.get_mut(id).map(|s| &mut s.value)
    }

    pub(crate) fn remove(&mut self, id: &str) -> Option<T> {
        let slot = self.slots.remove(id)?;
        self.order.remove(&slot.seq);
        self.weight = self.weight.saturating_sub(slot.weight);
        Some(slot.value)
    }

    /// Objects from the oldest to the newest.
    pub(crate) fn iter(&self) -> impl DoubleEndedIterator<Item = (&str, &T)> {
        self.order
            .values()
            .filter_map(|id| self.slots.get(id).map(|slot| (id.as_str(), &slot.value)))
    }

    fn drop_oldest(&mut self) {
        if let Some((_, id)) = self.order.pop_first()
            && let Some(slot) = self.slots.remove(&id)
        {
            self.weight = self.weight.saturating_sub(slot.weight);
        }
    }
}

/// `limit`, `order` and `after` of a list request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ListQuery {
    pub(crate) limit: usize,
    pub(crate) ascending: bool,
    pub(crate) after: Option<String>,
}

impl ListQuery {
    /// Read the query string. Lists are newest first unless `order=asc`.
    pub(crate) fn parse(
        query: Option<&str>,
        default_limit: usize,
        max_limit: usize,
    ) -> Result<Self, (String, &'static str)> {
        let limit = match query_param(query, "limit") {
            None => default_limit,
            Some(v) => match v.parse::<usize>() {
                Ok(n) if (1..=max_limit).contains(&n) => n,
                _ => {
                    return Err((
                        format!("Invalid 'limit': expected an integer from 1 to {max_limit}."),
                        "limit",
                    ));
                }
            },
        };
        let ascending = match query_param(query, "order") {
            None | Some("desc") => false,
            Some("asc") => true,
            Some(_) => return Err(("Invalid 'order': expected 'asc' or 'desc'.".into(), "order")),
        };
        let after = query_param(query, "after")
            .filter(|a| !a.is_empty())
            .map(str::to_string);
        Ok(ListQuery {
            limit,
            ascending,
            after,
        })
    }
}

/// One page of a list: `items` come oldest first, each an object with an `id`.
/// `{"object":"list","data":[...],"first_id","last_id","has_more"}`.
pub(crate) fn list_page(mut items: Vec<Value>, q: &ListQuery) -> Value {
    if !q.ascending {
        items.reverse();
    }
    let start = q
        .after
        .as_deref()
        .and_then(|after| items.iter().position(|v| v["id"] == after))
        .map_or(0, |i| i + 1);
    let rest = items.len().saturating_sub(start);
    let data: Vec<Value> = items.into_iter().skip(start).take(q.limit).collect();
    let id_of = |v: Option<&Value>| v.map_or(Value::Null, |v| v["id"].clone());
    json!({
        "object": "list",
        "data": data,
        "first_id": id_of(data.first()),
        "last_id": id_of(data.last()),
        "has_more": rest > data.len(),
    })
}

/// Everything a region remembers between requests.
pub(crate) struct Stores {
    pub(crate) responses: Mutex<BoundedStore<StoredResponse>>,
    pub(crate) files: Mutex<BoundedStore<StoredFile>>,
    pub(crate) batches: Mutex<BoundedStore<Value>>,
}

impl Stores {
    pub(crate) fn new() -> Self {
        Stores {
            responses: Mutex::new(BoundedStore::new(MAX_OBJECTS, MAX_RESPONSE_BYTES)),
            files: Mutex::new(BoundedStore::new(MAX_OBJECTS, MAX_FILE_BYTES)),
            batches: Mutex::new(BoundedStore::new(MAX_OBJECTS, MAX_BATCH_BYTES)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids<T>(s: &BoundedStore<T>) -> Vec<String> {
        s.iter().map(|(id, _)| id.to_string()).collect()
    }

    #[test]
    fn ids_have_prefix_and_32_hex_digits() {
        let id = new_id("resp_");
        let hex = id.strip_prefix("resp_").unwrap();
        assert_eq!(hex.len(), 32);
        assert!(
            hex.chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        assert_ne!(new_id("x"), new_id("x"));
    }

    #[test]
    fn count_cap_drops_the_oldest() {
        let mut s = BoundedStore::new(3, usize::MAX);
        for i in 0..5 {
            s.insert(format!("o{i}"), i, 1);
        }
        assert_eq!(s.len(), 3);
        assert_eq!(ids(&s), ["o2", "o3", "o4"]);
        assert!(s.get("o1").is_none());
        assert_eq!(s.get("o4"), Some(&4));
        // Deleting from the middle frees a place without dropping anything else.
        assert_eq!(s.remove("o3"), Some(3));
        s.insert("o5".into(), 5, 1);
        assert_eq!(ids(&s), ["o2", "o4", "o5"]);
        assert_eq!(s.remove("o3"), None);
    }

    #[test]
    fn weight_cap_drops_the_oldest_and_keeps_one_oversized_object() {
        let mut s = BoundedStore::new(100, 10);
        s.insert("a".into(), (), 4);
        s.insert("b".into(), (), 4);
        assert_eq!(s.weight(), 8);
        s.insert("c".into(), (), 4);
        assert_eq!(ids(&s), ["b", "c"]);
        assert_eq!(s.weight(), 8);
        s.insert("huge".into(), (), 50);
        assert_eq!(ids(&s), ["huge"]);
        assert_eq!(s.weight(), 50);
        s.insert("d".into(), (), 1);
        assert_eq!(ids(&s), ["d"]);
    }

    #[test]
    fn reinserting_moves_to_the_newest_place() {
        let mut s = BoundedStore::new(10, 10);
        s.insert("z".into(), 9, 1);
        s.insert("b".into(), 2, 1);
        s.insert("z".into(), 10, 3);
        assert_eq!(ids(&s), ["b", "z"]);
        assert_eq!(s.weight(), 4);
        *s.get_mut("z").unwrap() = 99;
        assert_eq!(s.get("z"), Some(&99));
        assert!(s.get_mut("gone").is_none());
    }

    #[test]
    fn list_pages_follow_order_limit_and_after() {
        let items: Vec<Value> = (1..=5).map(|i| json!({ "id": format!("x{i}") })).collect();
        let ids = |page: &Value| -> Vec<String> {
            page["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v["id"].as_str().unwrap().to_string())
                .collect()
        };
        let q = ListQuery::parse(None, 20, 100).unwrap();
        assert_eq!(q.limit, 20);
        let page = list_page(items.clone(), &q);
        assert_eq!(page["object"], "list");
        assert_eq!(ids(&page), ["x5", "x4", "x3", "x2", "x1"]);
        assert_eq!(page["first_id"], "x5");
        assert_eq!(page["last_id"], "x1");
        assert_eq!(page["has_more"], false);

        let q = ListQuery::parse(Some("order=asc&limit=2&after=x1"), 20, 100).unwrap();
        let page = list_page(items.clone(), &q);
        assert_eq!(ids(&page), ["x2", "x3"]);
        assert_eq!(page["has_more"], true);
        let q = ListQuery::parse(Some("limit=2&after=x2"), 20, 100).unwrap();
        let page = list_page(items.clone(), &q);
        assert_eq!(ids(&page), ["x1"]);
        assert_eq!(page["has_more"], false);

        let page = list_page(Vec::new(), &q);
        assert_eq!(page["data"], json!([]));
        assert!(page["first_id"].is_null() && page["last_id"].is_null());

        for bad in ["limit=0", "limit=101", "limit=x", "order=up"] {
            assert!(ListQuery::parse(Some(bad), 20, 100).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_region_stores_are_bounded_to_ten_thousand() {
        let mut s = BoundedStore::new(MAX_OBJECTS, MAX_FILE_BYTES);
        for i in 0..MAX_OBJECTS + 5 {
            s.insert(format!("f{i}"), (), 10);
        }
        assert_eq!(s.len(), MAX_OBJECTS);
        assert!(s.get("f4").is_none());
        assert!(s.get("f5").is_some());
    }
}
