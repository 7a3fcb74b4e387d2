//! How many migrations run at once, and which waiting one goes next: plain functions
//! over a snapshot of the Migrations, like KubeVirt's `parallelMigrationsPerCluster`
//! and `parallelOutboundMigrationsPerNode`. The reconciler takes the snapshot (under
//! one lock, so two Pending Migrations never both take the last slot) and records a
//! refusal in `status.queued`.
use std::cmp::Reverse;

/// The limits (controller flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Migrations past Pending at once in this cluster (its controller's).
    pub per_cluster: usize,
    /// Of those, from one source node.
    pub per_node: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            per_cluster: 5,
            per_node: 2,
        }
    }
}

/// The order of waiting Migrations: drain's first (a node is waiting to be emptied),
/// then higher `spec.priority`, then older, then by namespace and name. Everything in it
/// is in the objects, so a restarted controller keeps the order.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Key {
    rank: (Reverse<bool>, Reverse<i32>, i64, String),
}

impl Key {
    /// `created_ms`: creationTimestamp; `id`: `namespace/name`.
    pub fn new(drain: bool, priority: i32, created_ms: i64, id: &str) -> Key {
        Key {
            rank: (
                Reverse(drain),
                Reverse(priority),
                created_ms,
                id.to_string(),
            ),
        }
    }
}

/// One other Migration of the snapshot.
#[derive(Debug, Clone)]
pub struct Entry {
    pub key: Key,
    /// Its source node, once validation found it (every active or queued one has it).
    pub source_node: Option<String>,
    pub state: State,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Past Pending and not finished: holds a slot.
    Active,
    /// Validated and waiting for a slot.
    Queued,
    /// New, or finished: holds nothing and is not waiting.
    Other,
}

/// Whether the Migration `me` (from `node`) may start now, given every other Migration;
/// otherwise why it waits.
pub fn admit(me: &Key, node: &str, others: &[Entry], limits: Limits) -> Result<(), String> {
    let on_node = |e: &&Entry| e.source_node.as_deref() == Some(node);
    let active = others.iter().filter(|e| e.state == State::Active);
    let ahead = || {
        others
            .iter()
            .filter(|e| e.state == State::Queued && e.key < *me)
    };
    let cluster_busy = active.clone().count() + ahead().count();
    if cluster_busy >= limits.per_cluster {
        return Err(format!(
            "{} migrations run in this cluster and {} wait ahead of this one (at most {} at \
             once: --parallel-migrations-per-cluster)",
            active.clone().count(),
            ahead().count(),
            limits.per_cluster
        ));
    }
    let node_active = active.clone().filter(on_node).count();
    let node_ahead = ahead().filter(on_node).count();
    if node_active + node_ahead >= limits.per_node {
        return Err(format!(
            "{node_active} migrations run from node {node} and {node_ahead} wait ahead of this \
             one (at most {} at once: --parallel-outbound-migrations-per-node)",
            limits.per_node
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(key: Key, node: &str, state: State) -> Entry {
        Entry {
            key,
            source_node: Some(node.into()),
            state,
        }
    }

    const LIMITS: Limits = Limits {
        per_cluster: 3,
        per_node: 2,
    };

    #[test]
    fn drain_then_priority_then_age_then_name() {
        let mut keys = [
            Key::new(false, 0, 10, "a/old"),
            Key::new(false, 5, 50, "a/important"),
            Key::new(true, 0, 90, "a/drained"),
            Key::new(false, 0, 10, "a/also-old"),
            Key::new(false, 0, 20, "a/young"),
        ];
        keys.sort();
        let ids: Vec<&str> = keys.iter().map(|k| k.rank.3.as_str()).collect();
        assert_eq!(
            ids,
            ["a/drained", "a/important", "a/also-old", "a/old", "a/young"]
        );
    }

    #[test]
    fn a_node_sends_at_most_its_limit_and_the_cluster_at_most_its_own() {
        let me = Key::new(false, 0, 100, "ns/me");
        let a = |node: &str| entry(Key::new(false, 0, 1, "ns/x"), node, State::Active);
        assert_eq!(admit(&me, "n1", &[], LIMITS), Ok(()));
        assert_eq!(admit(&me, "n1", &[a("n1")], LIMITS), Ok(()));
        let why = admit(&me, "n1", &[a("n1"), a("n1")], LIMITS).unwrap_err();
        assert!(why.contains("2 migrations run from node n1"), "{why}");
        // Another node's migrations count only towards the cluster's limit.
        assert_eq!(admit(&me, "n1", &[a("n2"), a("n2")], LIMITS), Ok(()));
        let why = admit(&me, "n1", &[a("n2"), a("n2"), a("n3")], LIMITS).unwrap_err();
        assert!(why.contains("3 migrations run in this cluster"), "{why}");
        // Finished and new ones hold nothing.
        let done = entry(Key::new(false, 0, 1, "ns/d"), "n1", State::Other);
        assert_eq!(
            admit(&me, "n1", &[a("n1"), done.clone(), done], LIMITS),
            Ok(())
        );
    }

    #[test]
    fn those_ahead_in_the_queue_take_the_free_slots_first() {
        let me = Key::new(false, 0, 100, "ns/me");
        let active = entry(Key::new(false, 0, 1, "ns/a"), "n1", State::Active);
        let older = entry(Key::new(false, 0, 50, "ns/older"), "n1", State::Queued);
        let younger = entry(Key::new(false, 0, 150, "ns/younger"), "n1", State::Queued);
        // One slot left on n1: the older queued Migration gets it, not me.
        let why = admit(&me, "n1", &[active.clone(), older.clone()], LIMITS).unwrap_err();
        assert!(why.contains("1 wait ahead"), "{why}");
        // A younger one waits behind me.
        assert_eq!(
            admit(&me, "n1", &[active.clone(), younger.clone()], LIMITS),
            Ok(())
        );
        // The younger one, seen from its side, waits for me.
        let mine = entry(me.clone(), "n1", State::Queued);
        assert!(admit(&younger.key, "n1", &[active.clone(), mine], LIMITS).is_err());
        // Drain's and higher priorities jump the queue.
        let drained = Key::new(true, 0, 200, "ns/drained");
        assert_eq!(admit(&drained, "n1", &[active, older], LIMITS), Ok(()));
    }
}
