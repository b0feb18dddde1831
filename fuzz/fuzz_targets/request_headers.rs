//! libFuzzer target: `portcullis::fuzzing::request_headers` (the property is documented there).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| portcullis::fuzzing::request_headers(data));
