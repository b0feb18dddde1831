//! libFuzzer target: `portcullis::fuzzing::path_normalisation` (the property is documented there).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| portcullis::fuzzing::path_normalisation(data));
