#![no_main]
//! The join-token parser never panics, and whatever it accepts re-encodes to a token that
//! parses to the same value.
use libfuzzer_sys::fuzz_target;
use proto::JoinToken;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(token) = JoinToken::parse(text) {
        let again = JoinToken::parse(&token.encode()).expect("re-encoded token parses");
        assert_eq!(again, token);
    }
});
