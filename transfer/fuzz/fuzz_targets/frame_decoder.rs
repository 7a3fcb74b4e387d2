#![no_main]
//! libFuzzer target: the frame decoder of ferry-transfer's direct protocol.
use libfuzzer_sys::fuzz_target;

#[path = "../../src/frame.rs"]
#[allow(dead_code)]
mod frame;

fuzz_target!(|data: &[u8]| {
    frame::fuzz_decode(data);
});
