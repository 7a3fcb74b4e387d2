//! When a pre-copy migration stops converging, and what to switch to. Pure functions over
//! a history of `query-migrate` samples; the QMP side (`QemuBackend::follow`) only samples,
//! asks [`decide`] and executes the answer.
//!
//! Why per iteration and not per poll: QEMU recomputes `expected-downtime` from the dirty
//! set measured at each bitmap sync (`dirty-sync-count`), so between two syncs it only
//! wobbles with the bandwidth estimate. Comparing polls would call a long iteration a
//! stall; comparing completed iterations asks the real question: does each pass leave
//! less behind than the one before?
use super::MigrationProgress;
use serde::{Deserialize, Serialize};

/// What the source does when pre-copy does not converge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ConvergencePolicy {
    /// Plain pre-copy: a guest that dirties memory faster than the link runs until the
    /// caller's timeout.
    #[default]
    None,
    /// Pre-copy; on a stall switch to post-copy (`migrate-start-postcopy`). The guest then
    /// runs on the destination and pulls missing pages, so a destination or link failure
    /// after the switch loses the guest: the source can no longer resume it.
    PostCopy,
    /// Pre-copy; on a stall throttle the guest's vCPUs (auto-converge) hard enough that
    /// the dirty rate drops below the link. QEMU cannot turn the capability on while a
    /// migration runs, so it is on from the start with a 1%/+1% throttle (negligible)
    /// and the switch raises the throttle step.
    AutoConverge,
    /// Post-copy right after the first full RAM pass, without waiting for a stall: the
    /// shortest total time for a busy guest.
    PostCopyAfterFirstPass,
}

impl ConvergencePolicy {
    /// Needs the `postcopy-ram` capability on both ends before `migrate`.
    pub fn needs_postcopy_ram(self) -> bool {
        matches!(
            self,
            ConvergencePolicy::PostCopy | ConvergencePolicy::PostCopyAfterFirstPass
        )
    }

    /// Needs the `auto-converge` capability on the source before `migrate`.
    pub fn needs_auto_converge(self) -> bool {
        self == ConvergencePolicy::AutoConverge
    }
}

/// The switch the watcher made (reported in [`MigrationProgress::switched_to`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Switch {
    PostCopy,
    AutoConverge,
}

impl Switch {
    pub fn as_str(self) -> &'static str {
        match self {
            Switch::PostCopy => "post-copy",
            Switch::AutoConverge => "auto-converge",
        }
    }
}

/// When pre-copy counts as stalled.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StallRule {
    /// Completed iterations after the first full pass that made no progress.
    pub iterations: usize,
    /// Progress means a new low of expected downtime or of the dirty set that is at least
    /// this fraction below the best of all earlier iterations (measurement noise is a few
    /// percent).
    pub min_improvement: f64,
}

impl Default for StallRule {
    fn default() -> Self {
        StallRule {
            iterations: 2,
            min_improvement: 0.1,
        }
    }
}

/// One completed pre-copy iteration (the samples sharing one `dirty-sync-count`).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Iteration {
    /// The last sample's value: by then the bandwidth estimate has settled.
    expected_downtime_ms: u64,
    /// The largest `remaining` seen: close to the dirty set the sync left behind.
    dirty_bytes: u64,
}

/// Summarises completed iterations after the first pass (sync count >= 2), oldest first.
/// The iteration still running is left out: its numbers are not final.
fn iterations(history: &[MigrationProgress]) -> Vec<Iteration> {
    let mut out: Vec<(u64, Iteration)> = Vec::new();
    for p in history.iter().filter(|p| p.status == "active") {
        let Some(expected) = p.expected_downtime_ms else {
            continue;
        };
        if p.dirty_sync_count < 2 {
            continue;
        }
        match out.last_mut() {
            Some((sync, it)) if *sync == p.dirty_sync_count => {
                it.expected_downtime_ms = expected;
                it.dirty_bytes = it.dirty_bytes.max(p.remaining_bytes);
            }
            _ => out.push((
                p.dirty_sync_count,
                Iteration {
                    expected_downtime_ms: expected,
                    dirty_bytes: p.remaining_bytes,
                },
            )),
        }
    }
    out.pop(); // the running iteration
    out.into_iter().map(|(_, it)| it).collect()
}

/// True when the last `rule.iterations` completed iterations set no new low (by
/// `min_improvement`) in either expected downtime or dirty set, and the expected
/// downtime is still above the limit (below it QEMU finishes by itself).
pub(crate) fn is_stalled(
    rule: &StallRule,
    downtime_limit_ms: u64,
    history: &[MigrationProgress],
) -> bool {
    let its = iterations(history);
    if rule.iterations == 0 || its.len() < rule.iterations + 1 {
        return false;
    }
    let (before, window) = its.split_at(its.len() - rule.iterations);
    let last = window[window.len() - 1];
    if last.expected_downtime_ms <= downtime_limit_ms {
        return false;
    }
    let keep = 1.0 - rule.min_improvement;
    let best_dt = before
        .iter()
        .map(|i| i.expected_downtime_ms)
        .min()
        .unwrap_or(u64::MAX);
    let best_dirty = before
        .iter()
        .map(|i| i.dirty_bytes)
        .min()
        .unwrap_or(u64::MAX);
    let improved = window.iter().any(|i| {
        (i.expected_downtime_ms as f64) < best_dt as f64 * keep
            || (i.dirty_bytes as f64) < best_dirty as f64 * keep
    });
    !improved
}

/// What to do now, given everything sampled so far (oldest first). `None` once the
/// migration is no longer in pre-copy.
pub(crate) fn decide(
    policy: ConvergencePolicy,
    rule: &StallRule,
    downtime_limit_ms: u64,
    history: &[MigrationProgress],
) -> Option<Switch> {
    let last = history.last()?;
    if last.status != "active" {
        return None;
    }
    match policy {
        ConvergencePolicy::None => None,
        ConvergencePolicy::PostCopyAfterFirstPass => {
            (last.dirty_sync_count >= 2).then_some(Switch::PostCopy)
        }
        ConvergencePolicy::PostCopy => {
            is_stalled(rule, downtime_limit_ms, history).then_some(Switch::PostCopy)
        }
        ConvergencePolicy::AutoConverge => {
            is_stalled(rule, downtime_limit_ms, history).then_some(Switch::AutoConverge)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: u64 = 300;

    fn s(sync: u64, expected: u64, remaining: u64) -> MigrationProgress {
        MigrationProgress {
            status: "active".into(),
            dirty_sync_count: sync,
            expected_downtime_ms: Some(expected),
            remaining_bytes: remaining,
            ..Default::default()
        }
    }

    /// Several polls per iteration, like the real watcher sees them: `remaining` falls
    /// within an iteration and jumps back up at each sync.
    fn run(iters: &[(u64, u64)]) -> Vec<MigrationProgress> {
        let mut h = vec![s(1, LIMIT, 200 << 20), s(1, LIMIT, 100 << 20)];
        for (k, &(expected, dirty)) in iters.iter().enumerate() {
            let sync = k as u64 + 2;
            h.push(s(sync, expected + 5, dirty));
            h.push(s(sync, expected, dirty / 2));
        }
        h
    }

    // Shape measured on QEMU 10 / TCG: 256 MiB guest rewriting 64 MiB, 16 MiB/s link.
    const STUCK: &[(u64, u64)] = &[
        (4327, 57 << 20),
        (4160, 55 << 20),
        (4159, 54 << 20),
        (4159, 66 << 20),
        (4202, 67 << 20),
    ];

    #[test]
    fn stuck_precopy_is_a_stall() {
        // Iterations 2..=4 are complete (5 is running); 3 and 4 set no 10% low vs 2.
        let h = run(&STUCK[..4]);
        assert!(is_stalled(&StallRule::default(), LIMIT, &h));
        assert_eq!(
            decide(
                ConvergencePolicy::PostCopy,
                &StallRule::default(),
                LIMIT,
                &h
            ),
            Some(Switch::PostCopy)
        );
        assert_eq!(
            decide(
                ConvergencePolicy::AutoConverge,
                &StallRule::default(),
                LIMIT,
                &h
            ),
            Some(Switch::AutoConverge)
        );
        assert_eq!(
            decide(ConvergencePolicy::None, &StallRule::default(), LIMIT, &h),
            None
        );
    }

    #[test]
    fn needs_enough_completed_iterations() {
        // Two completed iterations after the first pass: one window of 2 needs a third.
        let h = run(&STUCK[..3]);
        assert!(!is_stalled(&StallRule::default(), LIMIT, &h));
        let rule = StallRule {
            iterations: 1,
            ..Default::default()
        };
        assert!(is_stalled(&rule, LIMIT, &h));
    }

    #[test]
    fn first_pass_alone_is_never_a_stall() {
        let h: Vec<_> = (0..50).map(|i| s(1, LIMIT * 10, (300 << 20) - i)).collect();
        assert!(!is_stalled(&StallRule::default(), LIMIT, &h));
    }

    #[test]
    fn converging_precopy_is_not_a_stall() {
        // Each pass leaves clearly less behind (auto-converge throttling in effect).
        let h = run(&[
            (4160, 60 << 20),
            (3911, 57 << 20),
            (3094, 40 << 20),
            (2589, 38 << 20),
            (1784, 9 << 20),
        ]);
        assert!(!is_stalled(&StallRule::default(), LIMIT, &h));
    }

    #[test]
    fn either_metric_improving_counts_as_progress() {
        // Expected downtime flat (bandwidth estimate), dirty set shrinking fast.
        let h = run(&[
            (4000, 60 << 20),
            (4000, 40 << 20),
            (4000, 20 << 20),
            (4000, 5 << 20),
        ]);
        assert!(!is_stalled(&StallRule::default(), LIMIT, &h));
    }

    #[test]
    fn below_the_limit_is_not_a_stall() {
        let h = run(&[
            (250, 1 << 20),
            (260, 1 << 20),
            (255, 1 << 20),
            (250, 1 << 20),
        ]);
        assert!(!is_stalled(&StallRule::default(), LIMIT, &h));
    }

    #[test]
    fn post_copy_after_first_pass() {
        let p = ConvergencePolicy::PostCopyAfterFirstPass;
        let r = StallRule::default();
        assert_eq!(decide(p, &r, LIMIT, &[s(1, LIMIT, 1 << 20)]), None);
        assert_eq!(
            decide(p, &r, LIMIT, &[s(1, LIMIT, 1 << 20), s(2, 900, 1 << 20)]),
            Some(Switch::PostCopy)
        );
    }

    #[test]
    fn only_switches_during_precopy() {
        let mut h = run(&STUCK[..4]);
        for status in [
            "postcopy-active",
            "completed",
            "failed",
            "setup",
            "cancelling",
        ] {
            h.last_mut().unwrap().status = status.into();
            for p in [
                ConvergencePolicy::PostCopy,
                ConvergencePolicy::AutoConverge,
                ConvergencePolicy::PostCopyAfterFirstPass,
            ] {
                assert_eq!(
                    decide(p, &StallRule::default(), LIMIT, &h),
                    None,
                    "{status}"
                );
            }
        }
        assert_eq!(
            decide(
                ConvergencePolicy::PostCopy,
                &StallRule::default(),
                LIMIT,
                &[]
            ),
            None
        );
    }

    #[test]
    fn samples_without_expected_downtime_are_ignored() {
        let mut h = run(&STUCK[..4]);
        for p in &mut h {
            p.expected_downtime_ms = None;
        }
        assert!(!is_stalled(&StallRule::default(), LIMIT, &h));
    }

    #[test]
    fn policy_capabilities() {
        use ConvergencePolicy::*;
        assert!(!None.needs_postcopy_ram() && !None.needs_auto_converge());
        assert!(PostCopy.needs_postcopy_ram() && !PostCopy.needs_auto_converge());
        assert!(PostCopyAfterFirstPass.needs_postcopy_ram());
        assert!(AutoConverge.needs_auto_converge() && !AutoConverge.needs_postcopy_ram());
    }
}
