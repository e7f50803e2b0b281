//! The flow table: a bounded map from a peer-side key to a flow, ordered by
//! last activity, with a limit per owning peer.
//!
//! Each flow gets a [`FlowId`] that is never reused, so an event from a
//! socket whose flow has already gone can never reach a newer flow that
//! took its place. Each flow belongs to one peer ([`PeerId`]), and the
//! limit, `capacity`, applies to each peer's flows on their own: inserting
//! for a peer that holds `capacity` flows evicts that peer's least recently
//! used flow, never another peer's. So one peer's flood cannot push out
//! another peer's flows, and the table as a whole holds at most
//! peers × `capacity` flows. [`FlowTable::expire`] removes flows idle for
//! longer than the idle timeout, whoever owns them. Both report what they
//! removed, so the caller can close the matching sockets.
//!
//! [`FlowTable::try_insert`] refuses instead of evicting, for TCP, where
//! closing a live connection to make room is worse than refusing a new one.
//!
//! Costs: lookup by key or id is a hash probe; a touch or an insert is
//! O(log n) in two activity indexes, the table's (for expiry) and the
//! owner's (for eviction).

use std::collections::{BTreeSet, HashMap};
use std::hash::Hash;
use std::time::{Duration, Instant};

use super::peers::PeerId;

/// Names one flow for its whole life. Never reused within a router.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowId(pub u64);

struct Entry<K, V> {
    key: K,
    owner: PeerId,
    last_active: Instant,
    value: V,
}

/// A flow table bounded per peer, with least-recently-used eviction within
/// a peer's flows and idle expiry.
pub struct FlowTable<K, V> {
    by_key: HashMap<K, FlowId>,
    entries: HashMap<FlowId, Entry<K, V>>,
    by_activity: BTreeSet<(Instant, FlowId)>,
    /// Each owner's flows by activity; an owner with none has no entry.
    by_owner: HashMap<PeerId, BTreeSet<(Instant, FlowId)>>,
    next_id: u64,
    capacity: usize,
    idle_timeout: Duration,
}

impl<K: Hash + Eq + Clone, V> FlowTable<K, V> {
    /// An empty table that holds at most `capacity` flows (at least one)
    /// per owner.
    pub fn new(capacity: usize, idle_timeout: Duration) -> Self {
        FlowTable {
            by_key: HashMap::new(),
            entries: HashMap::new(),
            by_activity: BTreeSet::new(),
            by_owner: HashMap::new(),
            next_id: 0,
            capacity: capacity.max(1),
            idle_timeout,
        }
    }

    /// The number of flows, of every owner.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// The number of flows of `owner`.
    pub fn owned(&self, owner: PeerId) -> usize {
        self.by_owner.get(&owner).map_or(0, BTreeSet::len)
    }

    /// The flows of `owner`, least recently used first.
    pub fn flows_of(&self, owner: PeerId) -> Vec<FlowId> {
        self.by_owner
            .get(&owner)
            .map(|set| set.iter().map(|&(_, id)| id).collect())
            .unwrap_or_default()
    }

    /// The owner of flow `id`.
    pub fn owner(&self, id: FlowId) -> Option<PeerId> {
        self.entries.get(&id).map(|e| e.owner)
    }

    /// Each owner that has flows, with how many.
    pub fn owners(&self) -> impl Iterator<Item = (PeerId, usize)> + '_ {
        self.by_owner.iter().map(|(&owner, set)| (owner, set.len()))
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

    /// Whether `owner` holds `capacity` flows.
    pub fn is_full(&self, owner: PeerId) -> bool {
        self.owned(owner) >= self.capacity
    }

    /// Adds a flow of `owner` for `key`, which must not be in the table,
    /// unless `owner` has its `capacity` of flows: then nothing is evicted
    /// and `value` comes back. For protocols where dropping a live flow is
    /// worse than refusing a new one (TCP).
    pub fn try_insert(
        &mut self,
        owner: PeerId,
        key: K,
        value: V,
        now: Instant,
    ) -> Result<FlowId, V> {
        if self.is_full(owner) {
            return Err(value);
        }
        let (id, evicted) = self.insert(owner, key, value, now);
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
            self.by_activity.insert((now, id));
            if let Some(set) = self.by_owner.get_mut(&entry.owner) {
                set.remove(&(entry.last_active, id));
                set.insert((now, id));
            }
            entry.last_active = now;
        }
        true
    }

    /// Adds a flow of `owner` for `key`, which must not be in the table. If
    /// `owner` has its `capacity` of flows, its least recently used flow is
    /// evicted and returned; other owners' flows are never touched.
    pub fn insert(
        &mut self,
        owner: PeerId,
        key: K,
        value: V,
        now: Instant,
    ) -> (FlowId, Option<(FlowId, K, V)>) {
        debug_assert!(!self.by_key.contains_key(&key));
        let evicted = if self.is_full(owner) {
            self.by_owner
                .get(&owner)
                .and_then(|set| set.first())
                .map(|&(_, oldest)| oldest)
                .and_then(|oldest| self.remove(oldest).map(|(k, v)| (oldest, k, v)))
        } else {
            None
        };
        let id = FlowId(self.next_id);
        self.next_id += 1;
        self.by_key.insert(key.clone(), id);
        self.by_activity.insert((now, id));
        self.by_owner.entry(owner).or_default().insert((now, id));
        self.entries.insert(
            id,
            Entry {
                key,
                owner,
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
        if let Some(set) = self.by_owner.get_mut(&entry.owner) {
            set.remove(&(entry.last_active, id));
            if set.is_empty() {
                self.by_owner.remove(&entry.owner);
            }
        }
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

    /// Removes every flow of `owner`, calling `on_removed` for each (least
    /// recently used first); returns how many: for a peer that went away.
    pub fn remove_owner(
        &mut self,
        owner: PeerId,
        mut on_removed: impl FnMut(FlowId, K, V),
    ) -> usize {
        let flows = self.flows_of(owner);
        for &id in &flows {
            if let Some((key, value)) = self.remove(id) {
                on_removed(id, key, value);
            }
        }
        flows.len()
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

    const P: PeerId = PeerId(0);
    const Q: PeerId = PeerId(1);

    #[test]
    fn a_full_owner_evicts_only_its_own_flows() {
        let t0 = Instant::now();
        let mut table = FlowTable::new(2, Duration::from_secs(60));
        let (q, _) = table.insert(Q, 0u32, (), t0);
        for i in 1..100u32 {
            let at = t0 + Duration::from_secs(u64::from(i));
            let (_, evicted) = table.insert(P, 1000 + i, (), at);
            if let Some((_, key, ())) = evicted {
                assert!(key > 1000, "{key}");
            }
        }
        assert_eq!(table.owned(P), 2);
        assert_eq!(table.owned(Q), 1);
        assert_eq!(table.lookup(&0), Some(q));
        assert!(table.try_insert(Q, 1, (), t0).is_ok());
        assert_eq!(table.try_insert(Q, 2, (), t0), Err(()));
        assert_eq!(table.flows_of(Q).len(), 2);
        table.remove(q);
        assert_eq!(table.owner(q), None);
        assert_eq!(table.owners().count(), 2);
    }

    #[test]
    fn full_table_evicts_least_recently_used() {
        let t0 = Instant::now();
        let mut table = FlowTable::new(2, Duration::from_secs(60));
        let (a, _) = table.insert(P, "a", (), t0);
        let (b, _) = table.insert(P, "b", (), t0 + Duration::from_secs(1));
        table.touch(a, t0 + Duration::from_secs(2));
        let (_, evicted) = table.insert(P, "c", (), t0 + Duration::from_secs(3));
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
        let (a, _) = table.insert(P, "a", 1, t0);
        let (b, _) = table.insert(P, "b", 2, t0);
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
        let a = table.try_insert(P, "a", 1, t0).unwrap();
        assert!(table.is_full(P));
        assert_eq!(table.try_insert(P, "b", 2, t0), Err(2));
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
        let (a, _) = table.insert(P, "a", (), t0);
        table.remove(a);
        let (a2, _) = table.insert(P, "a", (), t0);
        assert_ne!(a, a2);
        assert!(!table.touch(a, t0));
    }
}
