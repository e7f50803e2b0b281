#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| wgslirpy_fuzz::dns_query(data));
