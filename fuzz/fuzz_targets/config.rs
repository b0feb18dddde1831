//! libFuzzer target: `portcullis::fuzzing::config` (the property is documented there).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| portcullis::fuzzing::config(data));
