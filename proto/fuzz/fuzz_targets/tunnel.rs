#![no_main]
//! What a gateway, an agent or a replica reads from the network on a tunnel connection (the
//! frame length, the handshake, dial requests, stream openings, control frames): never a
//! panic, never an allocation past the limits, and what decodes survives a round trip.
//! (Snapshot uploads have their own target, `snapshot`.)
use libfuzzer_sys::fuzz_target;
use proto::tunnel::{
    decode_body, encode_frame, frame_len, Control, DialRequest, Hello, HelloAnswer, StreamOpen,
    MAX_TUNNEL_FRAME,
};

fn round_trip<T>(data: &[u8])
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq,
{
    if let Ok(m) = decode_body::<T>(data) {
        let framed = encode_frame(&m).expect("a decoded message encodes");
        let len = frame_len([framed[0], framed[1]]).expect("within the limit");
        assert!(len <= MAX_TUNNEL_FRAME);
        let again: T = decode_body(&framed[2..]).expect("round trip");
        assert!(again == m, "round trip changed the message");
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() >= 2 {
        let _ = frame_len([data[0], data[1]]);
    }
    round_trip::<Hello>(data);
    round_trip::<HelloAnswer>(data);
    round_trip::<DialRequest>(data);
    round_trip::<StreamOpen>(data);
    round_trip::<Control>(data);
});
