//! libFuzzer target: `portcullis::fuzzing::set_cookie` (the property is documented there).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| portcullis::fuzzing::set_cookie(data));
