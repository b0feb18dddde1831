//! libFuzzer target: `portcullis::fuzzing::proxy_header` (the property is documented there).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| portcullis::fuzzing::proxy_header(data));
