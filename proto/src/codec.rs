//! The one place that turns wire types into bytes and back.
//!
//! Frame: `[protocol version: u8][bincode 2 (serde mode, standard config) payload]`.
//! Decoding refuses empty input, frames over the caller's limit (checked before any decoding),
//! unknown versions, malformed payloads and trailing bytes.
//!
//! Decoded sizes are bounded too, not only encoded ones: the wire types mark their lists, maps
//! and strings with the [`bound`] helpers, which refuse a count or a length over its limit as
//! soon as its prefix is read (before any element is built), and every decode holds at most
//! [`MAX_ITEMS`] list and map entries in all (nested lists of tiny entries would otherwise
//! build dozens of bytes of memory per byte of input).
//!
//! Large frames that arrive compressed (snapshots) are decoded as they are read
//! ([`decode_from_read`]), not inflated first: a bound is then checked when its prefix comes
//! out of the decompressor, so a few KiB announcing millions of entries cost a few KiB.

use std::io::{self, Read};

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Current protocol version: the newest this side reads, and the one agents sign their
/// requests with (so a server knows they understand version 2's answers).
pub const PROTOCOL_VERSION: u8 = 2;
/// The version byte of frames whose layout no version changed (everything but the answers
/// of [`encode_for_peer`] and agents' signed requests): a peer of any supported version
/// reads them, so an upgraded gateway still talks to version-1 agents.
pub const BASE_VERSION: u8 = 1;
/// Oldest protocol version this build still reads.
pub const MIN_PROTOCOL_VERSION: u8 = 1;
/// Decode limit for small control messages (check-ins and their answers).
pub const MAX_CONTROL_FRAME: usize = 16 * 1024;

/// Most list and map entries one decoded message holds, all its lists and maps together.
/// An entry costs 24 to 200 bytes of memory however few bytes encode it, so without this a
/// 16 MiB frame of nested empty lists builds 400 MB; with it, the costliest shape (maps of
/// one-byte keys) peaks at about 65 MB. Only lists and maps declared with [`bound`] count;
/// byte strings (`Vec<u8>`) cost one byte per byte and are bounded by the frame.
pub const MAX_ITEMS: usize = 500_000;

/// bincode's own allocation limit, a second fence behind the length check.
const BINCODE_LIMIT: usize = 64 * 1024 * 1024;

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<BINCODE_LIMIT>()
}

/// Most bytes a frame read by [`decode_from_read`] may have. Reading (unlike decoding from a
/// slice) makes bincode reserve a byte string's announced length before reading it; that
/// limit is also bincode's, so a lying prefix reserves at most this much (untouched) memory.
/// The bounded strings of the wire types ([`bound::Text`], [`bound::ClipText`]) are read byte
/// by byte there, their length checked before anything is reserved.
pub const MAX_READ_FRAME: usize = 16 * 1024 * 1024;

fn read_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_READ_FRAME>()
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("empty message")]
    Empty,
    #[error("message of {len} bytes exceeds the limit of {limit} bytes")]
    TooLarge { len: usize, limit: usize },
    #[error("protocol version {got} is not supported (this side speaks {MIN_PROTOCOL_VERSION}..={PROTOCOL_VERSION})")]
    Version { got: u8 },
    #[error("malformed message: {0}")]
    Malformed(String),
    /// A list, map or string over its bound, or more than [`MAX_ITEMS`] entries in all;
    /// refused before the rest was built.
    #[error("message exceeds a decode limit: {0}")]
    Limit(String),
    #[error("message has {0} unexpected trailing bytes")]
    Trailing(usize),
    /// The source of [`decode_from_read`] failed (a corrupt compressed stream, say).
    #[error("could not read message: {0}")]
    Read(String),
    #[error("could not encode message: {0}")]
    Encode(String),
}

/// Encodes `msg` as a frame of [`BASE_VERSION`] (its layout is the same in every version).
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, CodecError> {
    let mut out = Vec::with_capacity(64);
    out.push(BASE_VERSION);
    encode_into(msg, &mut out)?;
    Ok(out)
}

/// Encodes an answer for a peer whose request came as `peer_version`. Version 2 appended one
/// optional field to the answers (`desired`, see [`crate::stacks`]); for a version-1 peer the
/// caller leaves it `None`, which bincode writes as one zero byte at the very end, and that
/// byte is left out: the frame is exactly what version 1 wrote.
pub fn encode_for_peer<T: Serialize>(msg: &T, peer_version: u8) -> Result<Vec<u8>, CodecError> {
    let mut out = encode(msg)?;
    if peer_version < 2 {
        if out.last() != Some(&0) {
            return Err(CodecError::Encode(
                "a version-1 peer cannot be told a desired state".into(),
            ));
        }
        out.pop();
        out[0] = 1;
    } else {
        out[0] = 2;
    }
    Ok(out)
}

/// The protocol version of a frame (its first byte), if it has one this side speaks.
pub fn frame_version(frame: &[u8]) -> Option<u8> {
    frame
        .first()
        .copied()
        .filter(|v| (MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(v))
}

/// Appends the bincode payload of `msg` (no version byte) to `out`.
pub(crate) fn encode_into<T: Serialize>(msg: &T, out: &mut Vec<u8>) -> Result<(), CodecError> {
    bincode::serde::encode_into_std_write(msg, out, config())
        .map(|_| ())
        .map_err(|e| CodecError::Encode(e.to_string()))
}

/// Decodes a versioned frame of at most `limit` bytes.
pub fn decode<T: DeserializeOwned>(frame: &[u8], limit: usize) -> Result<T, CodecError> {
    let payload = check_frame(frame, limit)?;
    decode_payload(payload)
}

/// Checks size and version; returns the payload after the version byte.
pub(crate) fn check_frame(frame: &[u8], limit: usize) -> Result<&[u8], CodecError> {
    if frame.len() > limit {
        return Err(CodecError::TooLarge {
            len: frame.len(),
            limit,
        });
    }
    let (&version, payload) = frame.split_first().ok_or(CodecError::Empty)?;
    if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&version) {
        return Err(CodecError::Version { got: version });
    }
    Ok(payload)
}

pub(crate) fn decode_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T, CodecError> {
    let (result, over_limit) = bound::with_budget(MAX_ITEMS, bound::Strings::Borrowed, || {
        bincode::serde::decode_from_slice(payload, config())
    });
    let (msg, used) = result.map_err(|e| decode_error(e, over_limit))?;
    if used != payload.len() {
        return Err(CodecError::Trailing(payload.len() - used));
    }
    Ok(msg)
}

fn decode_error(e: bincode::error::DecodeError, over_limit: bool) -> CodecError {
    let text = match e {
        bincode::error::DecodeError::OtherString(text) => text,
        other => other.to_string(),
    };
    if over_limit {
        CodecError::Limit(text)
    } else {
        CodecError::Malformed(text)
    }
}

/// Decodes a versioned frame of at most `limit` bytes (and at most [`MAX_READ_FRAME`]) as it
/// is read from `src`, never holding the frame itself: every bound is checked as its prefix
/// is read, before the rest is read or anything is built. At most [`READ_AHEAD`] bytes are
/// read ahead of the decoder. A source that fails gives [`CodecError::Read`]; one with more
/// than `limit` bytes, [`CodecError::TooLarge`] (with `len` = `limit` + 1: nothing past the
/// first byte too many is read).
pub fn decode_from_read<T: DeserializeOwned>(
    src: impl Read,
    limit: usize,
) -> Result<T, CodecError> {
    let limit = limit.min(MAX_READ_FRAME);
    let mut src = io::BufReader::with_capacity(
        READ_AHEAD,
        Counted {
            inner: src.take(limit as u64 + 1),
            read: 0,
            failed: None,
        },
    );
    let read_error = |src: &mut io::BufReader<Counted<_>>, e: io::Error| {
        CodecError::Read(src.get_mut().failed.take().unwrap_or_else(|| e.to_string()))
    };
    let too_large = |read: usize| CodecError::TooLarge { len: read, limit };
    let mut version = [0u8; 1];
    if let Err(e) = src.read_exact(&mut version) {
        return Err(match e.kind() {
            io::ErrorKind::UnexpectedEof if src.get_ref().failed.is_none() => CodecError::Empty,
            _ => read_error(&mut src, e),
        });
    }
    if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&version[0]) {
        return Err(CodecError::Version { got: version[0] });
    }
    let (result, over_limit) = bound::with_budget(MAX_ITEMS, bound::Strings::Read, || {
        bincode::serde::decode_from_std_read(&mut src, read_config())
    });
    let msg = match result {
        Ok(msg) => msg,
        Err(e) => {
            let counted = src.get_mut();
            return Err(if let Some(failed) = counted.failed.take() {
                CodecError::Read(failed)
            } else if counted.read > limit {
                too_large(counted.read)
            } else {
                decode_error(e, over_limit)
            });
        }
    };
    let buffered = src.buffer().len() as u64;
    let rest = io::copy(src.get_mut(), &mut io::sink());
    let counted = src.get_mut();
    if let Some(failed) = counted.failed.take() {
        return Err(CodecError::Read(failed));
    }
    if counted.read > limit {
        return Err(too_large(counted.read));
    }
    match rest {
        Ok(n) if n + buffered == 0 => Ok(msg),
        Ok(n) => Err(CodecError::Trailing(
            usize::try_from(n + buffered).unwrap_or(usize::MAX),
        )),
        Err(e) => Err(CodecError::Read(e.to_string())),
    }
}

/// What [`decode_from_read`] reads ahead of the decoder.
pub const READ_AHEAD: usize = 32 * 1024;

/// A reader that counts what it gave and remembers its source's first error (bincode folds
/// it into its own).
struct Counted<R> {
    inner: R,
    read: usize,
    failed: Option<String>,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.inner.read(buf) {
            Ok(n) => {
                self.read += n;
                Ok(n)
            }
            Err(e) => {
                if e.kind() != io::ErrorKind::Interrupted && self.failed.is_none() {
                    self.failed = Some(e.to_string());
                }
                Err(e)
            }
        }
    }
}

/// Deserialize-side bounds, for `#[serde(deserialize_with = ...)]` helpers of the wire types.
///
/// Each bound is a [`DeserializeSeed`] that can be used again for every element: [`Text`]
/// (a string of at most `max` bytes), [`List`] and [`Map`] (at most `max` entries of
/// other seeds), [`Opt`] and [`Plain`] (any `Deserialize` type, unbounded itself). A list or
/// map whose announced length is over its bound is refused on its length prefix; one whose
/// length is not announced (a self-describing format) is refused at the first entry too many.
/// Within a [`decode`](super::decode) every list and map entry is also charged against
/// [`MAX_ITEMS`](super::MAX_ITEMS) for the whole message; outside one (JSON, say) only the
/// per-list bounds apply. Encoding is untouched: the bytes of valid messages do not change.
pub mod bound {
    use std::cell::Cell;
    use std::collections::BTreeMap;
    use std::fmt;
    use std::marker::PhantomData;

    use serde::de::{self, DeserializeOwned, DeserializeSeed, Deserializer, MapAccess, SeqAccess};

    /// Entries a list may reserve memory for before they are decoded (as serde does).
    const PREALLOC_BYTES: usize = 64 * 1024;

    #[derive(Clone, Copy)]
    struct Budget {
        left: usize,
        total: usize,
        exceeded: bool,
        strings: Strings,
    }

    /// How the running decode reads the bounded strings.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub(crate) enum Strings {
        /// As `&str` borrowed from the input (bincode from a slice): a lying length prefix
        /// costs nothing.
        Borrowed,
        /// As a list of bytes, which bincode encodes exactly as a string (its length, then the
        /// bytes): the length is checked before anything is reserved. From a reader, bincode
        /// would reserve a string's announced length before reading it.
        Read,
    }

    fn strings() -> Strings {
        BUDGET.with(|b| b.get().map_or(Strings::Borrowed, |b| b.strings))
    }

    thread_local! {
        /// The entry budget of the decode running on this thread, if any.
        static BUDGET: Cell<Option<Budget>> = const { Cell::new(None) };
    }

    /// Runs `decode` with a budget of `items` list and map entries; also says whether it
    /// stopped on a bound (of a list, a map, a string or the budget).
    pub(crate) fn with_budget<R>(
        items: usize,
        strings: Strings,
        decode: impl FnOnce() -> R,
    ) -> (R, bool) {
        struct Restore(Option<Budget>);
        impl Drop for Restore {
            fn drop(&mut self) {
                BUDGET.with(|b| b.set(self.0));
            }
        }
        let budget = Budget {
            left: items,
            total: items,
            exceeded: false,
            strings,
        };
        let restore = Restore(BUDGET.with(|b| b.replace(Some(budget))));
        let out = decode();
        let exceeded = BUDGET.with(|b| b.get().is_some_and(|b| b.exceeded));
        drop(restore);
        (out, exceeded)
    }

    /// An error about a bound, remembered so the codec reports it as [`super::CodecError::Limit`].
    fn over<E: de::Error>(msg: fmt::Arguments<'_>) -> E {
        BUDGET.with(|b| {
            if let Some(mut budget) = b.get() {
                budget.exceeded = true;
                b.set(Some(budget));
            }
        });
        E::custom(msg)
    }

    /// Takes `n` entries of `what` from the budget of the running decode.
    fn charge<E: de::Error>(what: &str, n: usize) -> Result<(), E> {
        let Some(mut budget) = BUDGET.with(Cell::get) else {
            return Ok(());
        };
        if n > budget.left {
            return Err(over(format_args!(
                "{what}: the message holds more than {} list and map entries",
                budget.total
            )));
        }
        budget.left -= n;
        BUDGET.with(|b| b.set(Some(budget)));
        Ok(())
    }

    fn prealloc<T>(announced: usize) -> usize {
        announced.min(PREALLOC_BYTES / std::mem::size_of::<T>().max(1))
    }

    /// A string of at most `max` bytes. Read as a borrowed `&str` where the format allows
    /// (bincode from a slice does): a length prefix that lies allocates nothing.
    #[derive(Clone, Copy, Debug)]
    pub struct Text {
        pub what: &'static str,
        pub max: usize,
    }

    impl Text {
        fn check<E: de::Error>(self, len: usize) -> Result<(), E> {
            if len > self.max {
                return Err(over(format_args!(
                    "{}: a string of {len} bytes, more than the limit of {}",
                    self.what, self.max
                )));
            }
            Ok(())
        }
    }

    impl<'de> DeserializeSeed<'de> for Text {
        type Value = String;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<String, D::Error> {
            match strings() {
                Strings::Borrowed => d.deserialize_str(self),
                Strings::Read => d.deserialize_seq(TextBytes {
                    keep: self.max,
                    refuse: Some(self),
                }),
            }
        }
    }

    impl de::Visitor<'_> for Text {
        type Value = String;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "a string of at most {} bytes", self.max)
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
            self.check(v.len())?;
            Ok(v.to_owned())
        }
        fn visit_string<E: de::Error>(self, v: String) -> Result<String, E> {
            self.check(v.len())?;
            Ok(v)
        }
    }

    /// A string cut to at most `max` bytes (on a character boundary) rather than refused: for
    /// what a peer reports and we only show (an agent's error texts), so that one long text
    /// does not make its whole message, and everything else in it, refused for ever.
    #[derive(Clone, Copy, Debug)]
    pub struct ClipText {
        pub max: usize,
    }

    impl ClipText {
        fn clip(self, v: &str) -> String {
            let mut end = v.len().min(self.max);
            while !v.is_char_boundary(end) {
                end -= 1;
            }
            v[..end].to_owned()
        }
    }

    impl<'de> DeserializeSeed<'de> for ClipText {
        type Value = String;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<String, D::Error> {
            match strings() {
                Strings::Borrowed => d.deserialize_str(self),
                Strings::Read => d.deserialize_seq(TextBytes {
                    keep: self.max,
                    refuse: None,
                }),
            }
        }
    }

    /// A bounded string read as a list of bytes ([`Strings::Read`]): refused on its length
    /// when over a [`Text`]'s bound, or cut to `keep` bytes (on a character boundary) for a
    /// [`ClipText`], the bytes past it read and dropped. What is kept must be UTF-8.
    #[derive(Clone, Copy)]
    struct TextBytes {
        keep: usize,
        refuse: Option<Text>,
    }

    impl<'de> de::Visitor<'de> for TextBytes {
        type Value = String;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "a string (of at most {} bytes)", self.keep)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<String, A::Error> {
            let announced = seq.size_hint().unwrap_or(0);
            if let Some(text) = self.refuse {
                text.check(announced)?;
            }
            let mut bytes = Vec::with_capacity(announced.min(self.keep));
            let mut cut = false;
            while let Some(b) = seq.next_element::<u8>()? {
                if bytes.len() < self.keep {
                    bytes.push(b);
                } else if let Some(text) = self.refuse {
                    text.check(bytes.len() + 1)?;
                } else {
                    cut = true;
                }
            }
            match String::from_utf8(bytes) {
                Ok(text) => Ok(text),
                Err(e) => {
                    let valid = e.utf8_error().valid_up_to();
                    // A character cut in two at the clip is dropped; anything else is not UTF-8.
                    let bytes = e.into_bytes();
                    if cut && bytes.len() - valid < 4 && cut_short(&bytes[valid..]) {
                        let mut bytes = bytes;
                        bytes.truncate(valid);
                        Ok(String::from_utf8(bytes).unwrap_or_default())
                    } else {
                        Err(de::Error::invalid_value(
                            de::Unexpected::Bytes(&bytes[valid..bytes.len().min(valid + 4)]),
                            &"a UTF-8 string",
                        ))
                    }
                }
            }
        }
    }

    /// Whether `tail` (under 4 bytes) is the start of a character cut short.
    fn cut_short(tail: &[u8]) -> bool {
        std::str::from_utf8(tail).is_err_and(|e| e.error_len().is_none())
    }

    impl de::Visitor<'_> for ClipText {
        type Value = String;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a string")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
            Ok(self.clip(v))
        }
        fn visit_string<E: de::Error>(self, v: String) -> Result<String, E> {
            if v.len() <= self.max {
                return Ok(v);
            }
            Ok(self.clip(&v))
        }
    }

    /// Any `Deserialize` type, as an element of a bounded list (its own fields carry their
    /// bounds).
    pub struct Plain<T>(PhantomData<fn() -> T>);

    impl<T> Plain<T> {
        pub const fn new() -> Self {
            Self(PhantomData)
        }
    }

    impl<T> Default for Plain<T> {
        fn default() -> Self {
            Self::new()
        }
    }

    impl<T> Clone for Plain<T> {
        fn clone(&self) -> Self {
            *self
        }
    }

    impl<T> Copy for Plain<T> {}

    impl<'de, T: DeserializeOwned> DeserializeSeed<'de> for Plain<T> {
        type Value = T;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<T, D::Error> {
            T::deserialize(d)
        }
    }

    /// `None`, or what `E` decodes.
    #[derive(Clone, Copy, Debug)]
    pub struct Opt<E>(pub E);

    impl<'de, E: DeserializeSeed<'de> + Copy> DeserializeSeed<'de> for Opt<E> {
        type Value = Option<E::Value>;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_option(self)
        }
    }

    impl<'de, E: DeserializeSeed<'de> + Copy> de::Visitor<'de> for Opt<E> {
        type Value = Option<E::Value>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an optional value")
        }
        fn visit_none<Er: de::Error>(self) -> Result<Self::Value, Er> {
            Ok(None)
        }
        fn visit_unit<Er: de::Error>(self) -> Result<Self::Value, Er> {
            Ok(None)
        }
        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            self.0.deserialize(d).map(Some)
        }
    }

    /// A list of at most `max` entries, each decoded by `elem`.
    #[derive(Clone, Copy, Debug)]
    pub struct List<E> {
        pub what: &'static str,
        pub max: usize,
        pub elem: E,
    }

    fn too_many<E: de::Error>(what: &str, n: usize, max: usize) -> E {
        over(format_args!(
            "{what}: {n} entries, more than the limit of {max}"
        ))
    }

    impl<'de, E: DeserializeSeed<'de> + Copy> DeserializeSeed<'de> for List<E> {
        type Value = Vec<E::Value>;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_seq(self)
        }
    }

    impl<'de, E: DeserializeSeed<'de> + Copy> de::Visitor<'de> for List<E> {
        type Value = Vec<E::Value>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "a list of at most {} entries", self.max)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            // The announced length is checked and charged before any entry is decoded.
            let announced = seq.size_hint().unwrap_or(0);
            if announced > self.max {
                return Err(too_many(self.what, announced, self.max));
            }
            charge(self.what, announced)?;
            let mut out = Vec::with_capacity(prealloc::<E::Value>(announced));
            while let Some(v) = seq.next_element_seed(self.elem)? {
                if out.len() == self.max {
                    return Err(too_many(self.what, out.len() + 1, self.max));
                }
                if out.len() >= announced {
                    charge(self.what, 1)?;
                }
                out.push(v);
            }
            Ok(out)
        }
    }

    /// A map of at most `max` entries, keys decoded by `key` and values by `value`.
    #[derive(Clone, Copy, Debug)]
    pub struct Map<K, V> {
        pub what: &'static str,
        pub max: usize,
        pub key: K,
        pub value: V,
    }

    impl<'de, K, V> DeserializeSeed<'de> for Map<K, V>
    where
        K: DeserializeSeed<'de> + Copy,
        K::Value: Ord,
        V: DeserializeSeed<'de> + Copy,
    {
        type Value = BTreeMap<K::Value, V::Value>;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_map(self)
        }
    }

    impl<'de, K, V> de::Visitor<'de> for Map<K, V>
    where
        K: DeserializeSeed<'de> + Copy,
        K::Value: Ord,
        V: DeserializeSeed<'de> + Copy,
    {
        type Value = BTreeMap<K::Value, V::Value>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "a map of at most {} entries", self.max)
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let announced = map.size_hint().unwrap_or(0);
            if announced > self.max {
                return Err(too_many(self.what, announced, self.max));
            }
            charge(self.what, announced)?;
            let mut out = BTreeMap::new();
            let mut seen = 0usize;
            while let Some((k, v)) = map.next_entry_seed(self.key, self.value)? {
                if seen == self.max {
                    return Err(too_many(self.what, seen + 1, self.max));
                }
                if seen >= announced {
                    charge(self.what, 1)?;
                }
                seen += 1;
                out.insert(k, v);
            }
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{CheckinAnswer, CheckinRequest, EdgeStatus};
    use uuid::Uuid;

    #[test]
    fn round_trip_and_size() {
        let req = CheckinRequest {
            endpoint_id: 12345,
            edge_id: None,
            timestamp_lo: crate::wire::timestamp_lo(1_790_000_000_000),
            timestamp_hi: None,
            interval_secs: 5,
            agent: None,
        };
        let bytes = encode(&req).unwrap();
        assert!(
            bytes.len() <= 16,
            "steady check-in request is {} bytes",
            bytes.len()
        );
        assert_eq!(
            decode::<CheckinRequest>(&bytes, MAX_CONTROL_FRAME).unwrap(),
            req
        );
        let first = CheckinRequest {
            edge_id: Some(Uuid::new_v4()),
            ..req.clone()
        };
        assert_eq!(
            decode::<CheckinRequest>(&encode(&first).unwrap(), MAX_CONTROL_FRAME).unwrap(),
            first
        );

        let ans = CheckinAnswer {
            status: EdgeStatus::Idle,
            interval_secs: 5,
            server_time_ms: None,
            tunnel: None,
            desired: None,
        };
        let bytes = encode(&ans).unwrap();
        assert!(bytes.len() <= 6, "idle answer is {} bytes", bytes.len());
        assert_eq!(
            decode::<CheckinAnswer>(&bytes, MAX_CONTROL_FRAME).unwrap(),
            ans
        );
    }

    #[test]
    fn refusals() {
        let ans = CheckinAnswer {
            status: EdgeStatus::Required,
            interval_secs: 5,
            server_time_ms: Some(1),
            tunnel: None,
            desired: None,
        };
        let good = encode(&ans).unwrap();
        assert_eq!(decode::<CheckinAnswer>(&[], 100), Err(CodecError::Empty));
        assert_eq!(
            decode::<CheckinAnswer>(&good, 2),
            Err(CodecError::TooLarge {
                len: good.len(),
                limit: 2
            })
        );
        let mut bad_version = good.clone();
        bad_version[0] = 99;
        assert_eq!(
            decode::<CheckinAnswer>(&bad_version, 100),
            Err(CodecError::Version { got: 99 })
        );
        let mut trailing = good.clone();
        trailing.push(0);
        assert_eq!(
            decode::<CheckinAnswer>(&trailing, 100),
            Err(CodecError::Trailing(1))
        );
        assert!(matches!(
            decode::<CheckinAnswer>(&good[..good.len() - 1], 100),
            Err(CodecError::Malformed(_))
        ));
    }

    #[test]
    fn reading_decodes_and_refuses_as_slicing_does() {
        let ans = CheckinAnswer {
            status: EdgeStatus::Required,
            interval_secs: 5,
            server_time_ms: Some(1),
            tunnel: None,
            desired: None,
        };
        let good = encode(&ans).unwrap();
        let read = |frame: &[u8], limit| decode_from_read::<CheckinAnswer>(frame, limit);
        assert_eq!(read(&good, 100), Ok(ans));
        assert_eq!(read(&[], 100), Err(CodecError::Empty));
        // Found too large on the first byte past the limit, whatever follows.
        assert_eq!(
            read(&good, 2),
            Err(CodecError::TooLarge { len: 3, limit: 2 })
        );
        let mut bad_version = good.clone();
        bad_version[0] = 99;
        assert_eq!(
            read(&bad_version, 100),
            Err(CodecError::Version { got: 99 })
        );
        let mut trailing = good.clone();
        trailing.extend_from_slice(&[0, 0]);
        assert_eq!(read(&trailing, 100), Err(CodecError::Trailing(2)));
        assert!(matches!(
            read(&good[..good.len() - 1], 100),
            Err(CodecError::Malformed(_))
        ));
    }

    #[test]
    fn a_source_that_fails_is_a_read_error() {
        struct Broken;
        impl Read for Broken {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::other("corrupt block"))
            }
        }
        let good = encode(&CheckinAnswer {
            status: EdgeStatus::Idle,
            interval_secs: 5,
            server_time_ms: Some(1_790_000_000_000),
            tunnel: None,
            desired: None,
        })
        .unwrap();
        let failing_midway = (&good[..2]).chain(Broken);
        assert_eq!(
            decode_from_read::<CheckinAnswer>(failing_midway, 100),
            Err(CodecError::Read("corrupt block".into()))
        );
        assert_eq!(
            decode_from_read::<CheckinAnswer>(Broken, 100),
            Err(CodecError::Read("corrupt block".into()))
        );
    }

    /// A message with a refused and a clipped string.
    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Texts {
        #[serde(deserialize_with = "name")]
        name: String,
        #[serde(deserialize_with = "note")]
        note: String,
    }

    fn name<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
        use serde::de::DeserializeSeed;
        bound::Text {
            what: "name",
            max: 8,
        }
        .deserialize(d)
    }

    fn note<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
        use serde::de::DeserializeSeed;
        bound::ClipText { max: 5 }.deserialize(d)
    }

    #[test]
    fn read_strings_are_bounded_before_anything_is_reserved() {
        let frame = encode(&Texts {
            name: "édith".into(),
            note: "ééé".into(),
        })
        .unwrap();
        // Clipped on a character boundary, both ways.
        let clipped = Texts {
            name: "édith".into(),
            note: "éé".into(),
        };
        assert_eq!(decode::<Texts>(&frame, 100).unwrap(), clipped);
        assert_eq!(decode_from_read::<Texts>(&frame[..], 100).unwrap(), clipped);
        // A name announcing 10 MB, followed by one byte: refused on its length.
        let mut lying = vec![PROTOCOL_VERSION, 252];
        lying.extend_from_slice(&10_000_000u32.to_le_bytes());
        lying.push(b'a');
        let refused = "name: a string of 10000000 bytes, more than the limit of 8";
        assert_eq!(
            decode_from_read::<Texts>(&lying[..], 100),
            Err(CodecError::Limit(refused.into()))
        );
        // From a slice, on the bytes missing (it reserves nothing either).
        assert!(matches!(
            decode::<Texts>(&lying, 100),
            Err(CodecError::Malformed(_))
        ));
        // Not UTF-8: refused both ways.
        let mut bad = encode(&Texts {
            name: "ab".into(),
            note: String::new(),
        })
        .unwrap();
        bad[2] = 0xff;
        assert!(matches!(
            decode::<Texts>(&bad, 100),
            Err(CodecError::Malformed(_))
        ));
        assert!(matches!(
            decode_from_read::<Texts>(&bad[..], 100),
            Err(CodecError::Malformed(_))
        ));
    }

    #[test]
    fn huge_claimed_lengths_do_not_allocate() {
        // version, then a Vec length prefix claiming u64::MAX elements.
        let frame = [
            PROTOCOL_VERSION,
            0,
            5,
            0,
            1,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
        ];
        assert!(decode::<CheckinAnswer>(&frame, 100).is_err());
    }

    mod bounds {
        use super::super::bound::{self, List, Plain, Text};
        use super::*;
        use serde::de::value::{Error, SeqDeserializer, StrDeserializer};
        use serde::de::DeserializeSeed;

        /// A list whose length is not announced (as in JSON).
        fn unannounced(n: u32) -> SeqDeserializer<impl Iterator<Item = u32>, Error> {
            let mut i = 0;
            SeqDeserializer::new(std::iter::from_fn(move || {
                i += 1;
                (i <= n).then_some(i)
            }))
        }

        const LIST: List<Plain<u32>> = List {
            what: "numbers",
            max: 3,
            elem: Plain::new(),
        };

        #[test]
        fn a_list_without_an_announced_length_stops_at_the_first_entry_too_many() {
            assert_eq!(LIST.deserialize(unannounced(3)).unwrap(), [1, 2, 3]);
            let e = LIST.deserialize(unannounced(1_000_000)).unwrap_err();
            assert_eq!(
                e.to_string(),
                "numbers: 4 entries, more than the limit of 3"
            );
        }

        #[test]
        fn the_entry_budget_counts_every_list_of_one_decode_and_ends_with_it() {
            let (two_lists, over) = bound::with_budget(5, bound::Strings::Borrowed, || {
                LIST.deserialize(unannounced(3))?;
                LIST.deserialize(unannounced(3))
            });
            assert!(over);
            assert_eq!(
                two_lists.unwrap_err().to_string(),
                "numbers: the message holds more than 5 list and map entries"
            );
            // Outside a decode only the list's own bound applies.
            assert!(LIST.deserialize(unannounced(3)).is_ok());
            let (inner, over) = bound::with_budget(100, bound::Strings::Borrowed, || {
                bound::with_budget(1, bound::Strings::Borrowed, || {
                    LIST.deserialize(unannounced(2))
                })
                .0
            });
            assert!(
                inner.is_err() && !over,
                "the outer decode has its own budget"
            );
        }

        #[test]
        fn strings_are_bounded_in_bytes() {
            let text = Text {
                what: "name",
                max: 4,
            };
            let ok: StrDeserializer<'_, Error> = StrDeserializer::new("éé");
            assert_eq!(text.deserialize(ok).unwrap(), "éé");
            let long: StrDeserializer<'_, Error> = StrDeserializer::new("ééé");
            assert_eq!(
                text.deserialize(long).unwrap_err().to_string(),
                "name: a string of 6 bytes, more than the limit of 4"
            );
        }

        #[test]
        fn a_string_announcing_more_than_the_frame_is_malformed() {
            // AgentInfo's version claims 60 MiB (within bincode's own limit): a bounded
            // string is read borrowed, so the claim meets the end of the frame before any
            // allocation (bincode's owned read would first allocate the 60 MiB).
            let req = CheckinRequest {
                endpoint_id: 1,
                edge_id: None,
                timestamp_lo: 1,
                timestamp_hi: None,
                interval_secs: 5,
                agent: Some(crate::wire::AgentInfo {
                    version: String::new(),
                    platform: crate::wire::Platform::Docker,
                    hostname: String::new(),
                }),
            };
            let frame = encode(&req).unwrap();
            let at = frame.len() - 3; // version length, platform, hostname length
            let mut lying = frame[..at].to_vec();
            lying.push(252);
            lying.extend_from_slice(&(60u32 << 20).to_le_bytes());
            lying.extend_from_slice(&frame[at + 1..]);
            let e = decode::<CheckinRequest>(&lying, MAX_CONTROL_FRAME).unwrap_err();
            assert!(matches!(e, CodecError::Malformed(_)), "{e}");
        }
    }

    proptest::proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let _ = decode::<CheckinRequest>(&bytes, MAX_CONTROL_FRAME);
            let _ = decode::<CheckinAnswer>(&bytes, MAX_CONTROL_FRAME);
        }
    }
}
