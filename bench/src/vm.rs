//! vm benchmark cases (being written).
use crate::Measurement;

pub fn run(_quick: bool) -> anyhow::Result<Vec<Measurement>> {
    anyhow::bail!("the vm benchmark is not written yet")
}
