#![no_main]
//! The text an agent is given or told: join tokens and refusal codes. The join-token parser
//! never panics, and whatever it accepts re-encodes to a token that parses to the same value;
//! a refusal code reads back as the text it came from.
use libfuzzer_sys::fuzz_target;
use proto::{JoinToken, RefusalCode};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(token) = JoinToken::parse(text) {
        let again = JoinToken::parse(&token.encode()).expect("re-encoded token parses");
        assert_eq!(again, token);
    }
    let code = RefusalCode::parse(text);
    assert_eq!(code.as_str(), text);
    let _ = (code.retry_class(), code.hint(), code.kind());
});
