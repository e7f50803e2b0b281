//! The flow table: a bounded map from a peer-side key to a flow, ordered by
//! last activity.
//!
//! Each flow gets a [`FlowId`] that is never reused, so an event from a
//! socket whose flow has already gone can never reach a newer flow that
//! took its place. The table holds at most `capacity` flows; inserting into
//! a full table evicts the least recently used one, and [`FlowTable::expire`]
//! removes those idle for longer than the idle timeout. Both report what they
//! removed, so the caller can close the matching sockets.
//!
//! [`FlowTable::try_insert`] refuses instead of evicting, for TCP, where
//! closing a live connection to make room is worse than refusing a new one.
//!
//! Costs: lookup by key or id is a hash probe; a touch or an insert is
//! O(log n) in the activity index.

use std::collections::{BTreeSet, HashMap};
use std::hash::Hash;
use std::time::{Duration, Instant};

/// Names one flow for its whole life. Never reused within a router.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowId(pub u64);

struct Entry<K, V> {
    key: K,
    last_active: Instant,
    value: V,
}

/// A bounded flow table with least-recently-used eviction and idle expiry.
pub struct FlowTable<K, V> {
    by_key: HashMap<K, FlowId>,
    entries: HashMap<FlowId, Entry<K, V>>,
    by_activity: BTreeSet<(Instant, FlowId)>,
    next_id: u64,
    capacity: usize,
    idle_timeout: Duration,
}

impl<K: Hash + Eq + Clone, V> FlowTable<K, V> {
    /// An empty table that holds at most `capacity` flows (at least one).
    pub fn new(capacity: usize, idle_timeout: Duration) -> Self {
        FlowTable {
            by_key: HashMap::new(),
            entries: HashMap::new(),
            by_activity: BTreeSet::new(),
            next_id: 0,
            capacity: capacity.max(1),
            idle_timeout,
        }
    }

    /// The number of flows.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The flow for `key`, if any.
    pub fn lookup(&self, key: &K) -> Option<FlowId> {
        self.by_key.get(key).copied()
    }

    /// The key and value of flow `id`.
    pub fn get(&self, id: FlowId) -> Option<(&K, &V)> {
        self.entries.get(&id).map(|e| (&e.key, &e.value))
    }

    /// The key and a mutable reference to the value of flow `id`.
    pub fn get_mut(&mut self, id: FlowId) -> Option<(&K, &mut V)> {
        self.entries.get_mut(&id).map(|e| (&e.key, &mut e.value))
    }

    /// Whether the table holds `capacity` flows.
    pub fn is_full(&self) -> bool {
        self.entries.len() >= self.capacity
    }

    /// Adds a flow for `key`, which must not be in the table, unless the
    /// table is full: then nothing is evicted and `value` comes back. For
    /// protocols where dropping a live flow is worse than refusing a new
    /// one (TCP).
    pub fn try_insert(&mut self, key: K, value: V, now: Instant) -> Result<FlowId, V> {
        if self.is_full() {
            return Err(value);
        }
        let (id, evicted) = self.insert(key, value, now);
        debug_assert!(evicted.is_none());
        Ok(id)
    }

    /// Marks flow `id` active at `now`. Returns false if there is no such flow.
    pub fn touch(&mut self, id: FlowId, now: Instant) -> bool {
        let Some(entry) = self.entries.get_mut(&id) else {
            return false;
        };
        if now > entry.last_active {
            self.by_activity.remove(&(entry.last_active, id));
            entry.last_active = now;
            self.by_activity.insert((now, id));
        }
        true
    }

    /// Adds a flow for `key`, which must not be in the table. If the table is
    /// full, the least recently used flow is evicted and returned.
    pub fn insert(&mut self, key: K, value: V, now: Instant) -> (FlowId, Option<(FlowId, K, V)>) {
        debug_assert!(!self.by_key.contains_key(&key));
        let evicted = if self.entries.len() >= self.capacity {
            self.by_activity
                .first()
                .map(|&(_, oldest)| oldest)
                .and_then(|oldest| self.remove(oldest).map(|(k, v)| (oldest, k, v)))
        } else {
            None
        };
        let id = FlowId(self.next_id);
        self.next_id += 1;
        self.by_key.insert(key.clone(), id);
        self.by_activity.insert((now, id));
        self.entries.insert(
            id,
            Entry {
                key,
                last_active: now,
                value,
            },
        );
        (id, evicted)
    }

    /// Removes flow `id`, returning its key and value.
    pub fn remove(&mut self, id: FlowId) -> Option<(K, V)> {
        let entry = self.entries.remove(&id)?;
        self.by_activity.remove(&(entry.last_active, id));
        self.by_key.remove(&entry.key);
        Some((entry.key, entry.value))
    }

    /// Removes every flow idle since before `now - idle_timeout`, calling
    /// `on_expired` for each.
    pub fn expire(&mut self, now: Instant, mut on_expired: impl FnMut(FlowId, K, V)) {
        while let Some(&(last_active, id)) = self.by_activity.first() {
            if last_active + self.idle_timeout > now {
                break;
            }
            if let Some((key, value)) = self.remove(id) {
                on_expired(id, key, value);
            }
        }
    }

    /// Removes every flow, calling `on_removed` for each (oldest activity
    /// first): for closing everything at shutdown.
    pub fn drain(&mut self, mut on_removed: impl FnMut(FlowId, K, V)) {
        while let Some(&(_, id)) = self.by_activity.first() {
            if let Some((key, value)) = self.remove(id) {
                on_removed(id, key, value);
            }
        }
    }

    /// When the next flow will expire, if nothing touches it first.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.by_activity
            .first()
            .map(|&(last_active, _)| last_active + self.idle_timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_table_evicts_least_recently_used() {
        let t0 = Instant::now();
        let mut table = FlowTable::new(2, Duration::from_secs(60));
        let (a, _) = table.insert("a", (), t0);
        let (b, _) = table.insert("b", (), t0 + Duration::from_secs(1));
        table.touch(a, t0 + Duration::from_secs(2));
        let (_, evicted) = table.insert("c", (), t0 + Duration::from_secs(3));
        assert_eq!(evicted.map(|(id, k, _)| (id, k)), Some((b, "b")));
        assert_eq!(table.len(), 2);
        assert_eq!(table.lookup(&"a"), Some(a));
        assert_eq!(table.lookup(&"b"), None);
    }

    #[test]
    fn idle_flows_expire_and_touch_postpones() {
        let t0 = Instant::now();
        let idle = Duration::from_secs(10);
        let mut table = FlowTable::new(10, idle);
        let (a, _) = table.insert("a", 1, t0);
        let (b, _) = table.insert("b", 2, t0);
        table.touch(b, t0 + Duration::from_secs(5));
        assert_eq!(table.next_expiry(), Some(t0 + idle));

        let mut expired = Vec::new();
        table.expire(t0 + idle, |id, key, _| expired.push((id, key)));
        assert_eq!(expired, vec![(a, "a")]);
        assert_eq!(table.next_expiry(), Some(t0 + Duration::from_secs(15)));
    }

    #[test]
    fn try_insert_refuses_instead_of_evicting() {
        let t0 = Instant::now();
        let mut table = FlowTable::new(1, Duration::from_secs(60));
        let a = table.try_insert("a", 1, t0).unwrap();
        assert!(table.is_full());
        assert_eq!(table.try_insert("b", 2, t0), Err(2));
        assert_eq!(table.lookup(&"a"), Some(a));
        if let Some((_, v)) = table.get_mut(a) {
            *v = 3;
        }
        assert_eq!(table.get(a), Some((&"a", &3)));
    }

    #[test]
    fn ids_are_never_reused() {
        let t0 = Instant::now();
        let mut table = FlowTable::new(1, Duration::from_secs(1));
        let (a, _) = table.insert("a", (), t0);
        table.remove(a);
        let (a2, _) = table.insert("a", (), t0);
        assert_ne!(a, a2);
        assert!(!table.touch(a, t0));
    }
}
