//! Fuzz target: see `jat_proxy::invariants::wire_raw` for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| jat_proxy::invariants::wire_raw(data));
