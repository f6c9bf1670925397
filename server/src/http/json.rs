//! Reading request bodies field by field (unknown fields are ignored, a
//! wrong one is named with what it should be, as pydantic would), and
//! writing replies without a tree of values: floats as vLLM prints them
//! (the f32 widened to f64, shortest round trip), object keys in the order
//! given.

use std::fmt::Write as _;

use serde_json::{Map, Value};

use super::HttpError;

/// A parsed body: a JSON object.
pub type Object = Map<String, Value>;

/// Parses `body` as a JSON object.
pub fn object(body: &[u8]) -> Result<Object, HttpError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        HttpError::schema("json_invalid", format!("the request body is not valid JSON: {e}"), None)
    })?;
    match value {
        Value::Object(o) => Ok(o),
        other => Err(HttpError::schema(
            "model_attributes_type",
            format!("the request body must be a JSON object, not {}", kind(&other)),
            None,
        )),
    }
}

/// The JSON type of `v`, for messages.
pub fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Field `name`, absent or `null` being `None`.
pub fn get<'a>(o: &'a Object, name: &str) -> Option<&'a Value> {
    o.get(name).filter(|v| !v.is_null())
}

fn wrong(name: &str, what: &str, v: &Value, pydantic: &'static str) -> HttpError {
    HttpError::schema(pydantic, format!("`{name}` must be {what}, not {}", kind(v)), Some(name))
}

/// An integer (pydantic's lax mode: a boolean or an integral float too).
pub fn int(v: &Value, name: &str) -> Result<i64, HttpError> {
    match v {
        Value::Bool(b) => Ok(*b as i64),
        Value::Number(n) => n
            .as_i64()
            .or_else(|| {
                n.as_f64().filter(|f| f.fract() == 0.0 && f.abs() < 9.0e18).map(|f| f as i64)
            })
            .ok_or_else(|| {
                HttpError::schema(
                    "int_type",
                    format!("`{name}` must be an integer, not {n}"),
                    Some(name),
                )
            }),
        other => Err(wrong(name, "an integer", other, "int_type")),
    }
}

/// Optional integer field.
pub fn opt_int(o: &Object, name: &str) -> Result<Option<i64>, HttpError> {
    get(o, name).map(|v| int(v, name)).transpose()
}

/// A number.
pub fn float(v: &Value, name: &str) -> Result<f64, HttpError> {
    match v {
        Value::Number(n) => Ok(n.as_f64().unwrap_or(f64::NAN)),
        other => Err(wrong(name, "a number", other, "float_type")),
    }
}

/// Optional number field.
pub fn opt_float(o: &Object, name: &str) -> Result<Option<f64>, HttpError> {
    get(o, name).map(|v| float(v, name)).transpose()
}

/// A boolean (pydantic's lax mode: 0 and 1 too).
pub fn boolean(v: &Value, name: &str) -> Result<bool, HttpError> {
    match v {
        Value::Bool(b) => Ok(*b),
        Value::Number(n) if n.as_i64() == Some(0) => Ok(false),
        Value::Number(n) if n.as_i64() == Some(1) => Ok(true),
        other => Err(wrong(name, "a boolean", other, "bool_type")),
    }
}

/// Optional boolean field.
pub fn opt_bool(o: &Object, name: &str) -> Result<Option<bool>, HttpError> {
    get(o, name).map(|v| boolean(v, name)).transpose()
}

/// Optional string field.
pub fn opt_str<'a>(o: &'a Object, name: &str) -> Result<Option<&'a str>, HttpError> {
    match get(o, name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(wrong(name, "a string", other, "string_type")),
    }
}

/// Whether `v` is a list of numbers (one token-id list) rather than a list
/// of lists or strings.
pub fn is_id_list(v: &Value) -> bool {
    matches!(v, Value::Array(a) if a.iter().all(Value::is_number))
}

/// A list of token ids: integers from 0 to u32::MAX (ids past the
/// vocabulary are refused by the service, which names them).
pub fn ids(v: &Value, name: &str) -> Result<Vec<u32>, HttpError> {
    let Value::Array(items) = v else {
        return Err(wrong(name, "a list of token ids", v, "list_type"));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let id = int(item, name).map_err(|_| {
                HttpError::schema(
                    "int_type",
                    format!("`{name}`[{i}] must be a token id (an integer), not {}", kind(item)),
                    Some(name),
                )
            })?;
            u32::try_from(id).map_err(|_| {
                HttpError::schema(
                    "greater_than_equal",
                    format!("`{name}`[{i}] = {id} is not a token id (0 to {})", u32::MAX),
                    Some(name),
                )
            })
        })
        .collect()
}

/// A list of token-id lists.
pub fn id_lists(v: &Value, name: &str) -> Result<Vec<Vec<u32>>, HttpError> {
    let Value::Array(items) = v else {
        return Err(wrong(name, "a list of token-id lists", v, "list_type"));
    };
    items.iter().map(|item| ids(item, name)).collect()
}

/// Writes JSON text.
#[derive(Default)]
pub struct Writer(pub String);

impl Writer {
    /// With room for `n` bytes.
    pub fn with_capacity(n: usize) -> Self {
        Self(String::with_capacity(n))
    }

    /// Raw JSON text.
    pub fn raw(&mut self, s: &str) -> &mut Self {
        self.0.push_str(s);
        self
    }

    /// A string, escaped.
    pub fn str(&mut self, s: &str) -> &mut Self {
        self.0.push_str(&Value::from(s).to_string());
        self
    }

    /// A string or `null`.
    pub fn opt_str(&mut self, s: Option<&str>) -> &mut Self {
        match s {
            Some(s) => self.str(s),
            None => self.raw("null"),
        }
    }

    /// An integer.
    pub fn int(&mut self, n: impl std::fmt::Display) -> &mut Self {
        let _ = write!(self.0, "{n}");
        self
    }

    /// A log-probability as vLLM prints it: the f32 widened to f64, in the
    /// shortest form that reads back to it (`-0.10536051541566849`), so
    /// that `np.float32(value)` is the server's f32 bit for bit. JSON has no
    /// -inf: a log-probability of -inf (an id the teacher masks) is written
    /// as OpenAI's -9999.0, as vLLM does in `logprobs`.
    pub fn logprob(&mut self, x: f32) -> &mut Self {
        if x.is_finite() {
            let _ = write!(self.0, "{:?}", f64::from(x));
        } else {
            self.0.push_str("-9999.0");
        }
        self
    }

    /// Done: the bytes.
    pub fn finish(self) -> Vec<u8> {
        self.0.into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_are_the_f32_widened_and_read_back_bit_for_bit() {
        for x in [-0.1f32, -1.0, -3.0, -1.0e-8, -17.123_457, 0.0, -100.5] {
            let mut w = Writer::default();
            w.logprob(x);
            let back: f64 = w.0.parse().unwrap();
            assert_eq!(back, f64::from(x), "{}", w.0);
            assert_eq!((back as f32).to_bits(), x.to_bits());
        }
        let mut w = Writer::default();
        w.logprob(f32::NEG_INFINITY).raw(",").logprob(-3.0);
        assert_eq!(w.0, "-9999.0,-3.0");
    }

    #[test]
    fn lax_integers_and_named_errors() {
        let o = object(br#"{"a": true, "b": 2.0, "c": "3", "d": null, "e": [1, -2]}"#).unwrap();
        assert_eq!(opt_int(&o, "a").unwrap(), Some(1));
        assert_eq!(opt_int(&o, "b").unwrap(), Some(2));
        assert_eq!(opt_int(&o, "c").unwrap_err().message, "`c` must be an integer, not a string");
        assert_eq!(opt_int(&o, "d").unwrap(), None);
        assert_eq!(opt_int(&o, "zz").unwrap(), None);
        let e = ids(get(&o, "e").unwrap(), "e").unwrap_err();
        assert_eq!(e.message, "`e`[1] = -2 is not a token id (0 to 4294967295)");
        assert!(object(b"[1]").unwrap_err().message.contains("must be a JSON object"));
        assert!(
            object(b"{").unwrap_err().message.starts_with("the request body is not valid JSON")
        );
    }
}
