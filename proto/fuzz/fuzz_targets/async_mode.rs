#![no_main]
//! Async mode's messages: the request the control plane reads (`AsyncRequest`, with its
//! check-in, snapshot report and command results) and the answer an agent reads
//! (`AsyncAnswer`, with its commands), and their parts alone. Never a panic; what decodes
//! survives a round trip; checking a decoded action never panics.
use libfuzzer_sys::fuzz_target;
use proto::async_mode::{
    Action, AsyncAnswer, AsyncRequest, Command, CommandResult, MAX_ASYNC_ANSWER, MAX_ASYNC_FRAME,
    MAX_COMMAND_BYTES,
};
use proto::codec::{decode, encode};

fn round_trip<T>(data: &[u8], limit: usize) -> Option<T>
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq,
{
    let m = decode::<T>(data, limit).ok()?;
    let again = encode(&m).expect("a decoded message encodes");
    let back: T = decode(&again, limit.max(again.len())).expect("round trip");
    assert!(back == m, "round trip changed the message");
    Some(m)
}

fn action(a: &Action) {
    let _ = a.validate();
    let _ = (a.kind(), a.target());
}

fuzz_target!(|data: &[u8]| {
    if let Some(req) = round_trip::<AsyncRequest>(data, MAX_ASYNC_FRAME) {
        assert!(req.results.len() <= proto::async_mode::MAX_RESULTS_PER_REQUEST);
    }
    if let Some(answer) = round_trip::<AsyncAnswer>(data, MAX_ASYNC_ANSWER) {
        assert!(answer.commands.len() <= proto::async_mode::MAX_COMMANDS_PER_ANSWER);
        answer.commands.iter().for_each(|c| action(&c.action));
    }
    if let Some(c) = round_trip::<Command>(data, MAX_COMMAND_BYTES) {
        action(&c.action);
    }
    if let Some(a) = round_trip::<Action>(data, MAX_COMMAND_BYTES) {
        action(&a);
    }
    let _ = round_trip::<CommandResult>(data, MAX_ASYNC_FRAME);
});
