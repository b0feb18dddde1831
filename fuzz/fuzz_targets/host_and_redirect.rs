//! libFuzzer target: `portcullis::fuzzing::host_and_redirect` (the property is documented there).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| portcullis::fuzzing::host_and_redirect(data));
