//! End-to-end scenarios (in `tests/`) and the demo (`ferry-demo`): ferry's controller,
//! real node daemons in network-namespace nodes, real control planes, runc and CRIU.
#![forbid(unsafe_code)]

pub mod chart;
pub mod http;
pub mod installed;
pub mod webhook;
pub mod world;
