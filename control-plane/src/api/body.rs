//! JSON request bodies, read as the OpenAPI document describes them: a struct only from a
//! JSON object (serde would also build one from an array of its fields in order, so
//! `[null, null]` passed for `{}`), and an integer from any JSON number without a fractional
//! part (`5.0` as `5`: JSON has one number type, and JSON Schema 2020-12's `integer` is any
//! number whose fractional part is zero).

use actix_web::dev::Payload;
use actix_web::{web, FromRequest, HttpRequest};
use serde::de::{
    self, DeserializeOwned, DeserializeSeed, Deserializer, IntoDeserializer, MapAccess, SeqAccess,
    Unexpected, Visitor,
};
use serde_json::{Number, Value};

use super::ApiError;

/// A JSON body, read as `web::Json` reads one (over the 4 MiB limit: 413; not JSON: 400),
/// then deserialised into `T` by [`from_json`] (unknown fields, wrong types: 400).
pub(crate) struct Json<T>(pub T);

impl<T: DeserializeOwned + 'static> FromRequest for Json<T> {
    type Error = actix_web::Error;
    type Future = futures_util::future::LocalBoxFuture<'static, Result<Self, Self::Error>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let value = web::Json::<Value>::from_request(req, payload);
        Box::pin(async move {
            let web::Json(value) = value.await?;
            Ok(Json(from_json(value)?))
        })
    }
}

/// A JSON value as `T`, strictly (the module's rules).
pub(crate) fn from_json<T: DeserializeOwned>(value: Value) -> Result<T, ApiError> {
    T::deserialize(Strict(value))
        .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))
}

/// A [`Value`] as a deserializer that builds structs from objects only.
struct Strict(Value);

type Error = serde_json::Error;

fn unexpected(v: &Value) -> Unexpected<'_> {
    match v {
        Value::Null => Unexpected::Other("null"),
        Value::Bool(b) => Unexpected::Bool(*b),
        Value::Number(_) => Unexpected::Other("number"),
        Value::String(s) => Unexpected::Str(s),
        Value::Array(_) => Unexpected::Seq,
        Value::Object(_) => Unexpected::Map,
    }
}

/// A number; whole ones written with a fraction or an exponent as the integers they are.
fn number<'de, V: Visitor<'de>>(n: Number, visitor: V) -> Result<V::Value, Error> {
    // 2^64 and -2^63: the bounds of the integers a float spells within u64 and i64.
    const TWO_64: f64 = 18_446_744_073_709_551_616.0;
    const MINUS_TWO_63: f64 = -9_223_372_036_854_775_808.0;
    if let Some(f) = n.as_f64().filter(|f| n.is_f64() && f.fract() == 0.0) {
        if (0.0..TWO_64).contains(&f) {
            return visitor.visit_u64(f as u64);
        }
        if (MINUS_TWO_63..0.0).contains(&f) {
            return visitor.visit_i64(f as i64);
        }
    }
    n.deserialize_any(visitor)
}

impl<'de> Deserializer<'de> for Strict {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.0 {
            Value::Null => visitor.visit_unit(),
            Value::Bool(b) => visitor.visit_bool(b),
            Value::Number(n) => number(n, visitor),
            Value::String(s) => visitor.visit_string(s),
            Value::Array(items) => {
                let len = items.len();
                let mut seq = Items(items.into_iter());
                let out = visitor.visit_seq(&mut seq)?;
                if seq.0.len() == 0 {
                    Ok(out)
                } else {
                    Err(de::Error::invalid_length(len, &"fewer elements"))
                }
            }
            Value::Object(fields) => visitor.visit_map(Fields {
                iter: fields.into_iter(),
                value: None,
            }),
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.0 {
            Value::Null => visitor.visit_none(),
            v => visitor.visit_some(Strict(v)),
        }
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        if self.0.is_object() {
            self.deserialize_any(visitor)
        } else {
            Err(de::Error::invalid_type(unexpected(&self.0), &visitor))
        }
    }

    /// Enums of a body are unit variants, named by a string.
    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        match self.0 {
            Value::String(s) => visitor.visit_enum(IntoDeserializer::<Error>::into_deserializer(s)),
            other => Err(de::Error::invalid_type(unexpected(&other), &visitor)),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Error> {
        visitor.visit_newtype_struct(self)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        unit unit_struct seq tuple tuple_struct map identifier ignored_any
    }
}

struct Items(std::vec::IntoIter<Value>);

impl<'de> SeqAccess<'de> for Items {
    type Error = Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Error> {
        self.0
            .next()
            .map(|v| seed.deserialize(Strict(v)))
            .transpose()
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.0.len())
    }
}

struct Fields {
    iter: serde_json::map::IntoIter,
    value: Option<Value>,
}

impl<'de> MapAccess<'de> for Fields {
    type Error = Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Error> {
        match self.iter.next() {
            Some((key, value)) => {
                self.value = Some(value);
                seed.deserialize(IntoDeserializer::<Error>::into_deserializer(key))
                    .map(Some)
            }
            None => Ok(None),
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Error> {
        let value = self
            .value
            .take()
            .ok_or_else(|| <Error as de::Error>::custom("a value without its key"))?;
        seed.deserialize(Strict(value))
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.iter.len())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::collections::BTreeMap;

    use serde::Deserialize;
    use serde_json::json;

    use super::*;

    #[derive(Deserialize, Debug, PartialEq)]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    struct Body {
        name: Option<String>,
        count: Option<u32>,
        share: Option<f64>,
        #[serde(default)]
        ids: Vec<u64>,
        #[serde(default)]
        vars: BTreeMap<String, String>,
        mode: Option<store::EdgeMode>,
        inner: Option<Inner>,
    }

    #[derive(Deserialize, Debug, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Inner {
        n: u8,
    }

    fn read(v: Value) -> Result<Body, String> {
        from_json(v).map_err(|e| e.to_string())
    }

    #[test]
    fn objects_read_as_serde_would() {
        let b = read(
            json!({"name": "x", "count": 5.0, "share": 1, "ids": [1, 2e0],
            "vars": {"A": "b"}, "mode": "async", "inner": {"n": 3}}),
        )
        .unwrap();
        assert_eq!(b.count, Some(5));
        assert_eq!(b.share, Some(1.0));
        assert_eq!(b.ids, vec![1, 2]);
        assert_eq!(b.mode, Some(store::EdgeMode::Async));
        assert_eq!(b.inner, Some(Inner { n: 3 }));
        assert_eq!(read(json!({})).unwrap().name, None);
    }

    #[test]
    fn what_the_document_refuses_is_refused() {
        for (v, says) in [
            (json!([null, null]), "invalid type: sequence"),
            (json!({"inner": [3]}), "invalid type: sequence"),
            (json!({"count": 5.5}), "invalid type"),
            (json!({"count": -1}), "invalid value"),
            (json!({"count": 4294967296u64}), "invalid value"),
            (json!({"mode": "turbo"}), "unknown variant"),
            (json!({"mode": 1}), "invalid type"),
            (json!({"colour": 1}), "unknown field"),
            (json!({"ids": {"a": 1}}), "invalid type: map"),
            (json!({"vars": [["A", "b"]]}), "invalid type: sequence"),
            (json!(null), "invalid type: null"),
        ] {
            let e = read(v.clone()).unwrap_err();
            assert!(e.contains(says), "{v}: {e}");
        }
    }
}
