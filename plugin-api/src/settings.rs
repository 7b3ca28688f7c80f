//! Connector settings: a small, documented subset of JSON Schema and its validator.
//!
//! A connector declares its settings in [`crate::Manifest::settings_schema`]; the host validates
//! the configured settings against it (and fills in defaults) before calling
//! [`crate::Connector::new`], so a connector only ever sees settings of the declared shape.
//!
//! # The supported subset
//!
//! ```json
//! {
//!   "type": "object",
//!   "properties": {
//!     "dir":        { "type": "string",  "description": "Folder to read" },
//!     "batch_size": { "type": "integer", "default": 5000, "minimum": 1 },
//!     "mode":       { "type": "string",  "enum": ["fast", "thorough"], "default": "fast" }
//!   },
//!   "required": ["dir"]
//! }
//! ```
//!
//! * top level: `type` (must be `"object"`), `properties`, `required`, `description`,
//!   `additionalProperties` (boolean);
//! * each property: `type` (`string`, `integer`, `number`, `boolean`, `array`, `object`),
//!   `description`, `default`, `enum` (allowed values), `minimum` / `maximum` (numbers).
//!
//! One difference from full JSON Schema, on purpose: settings not declared in `properties` are
//! **refused** (a misspelt setting is an error, not silently ignored) unless the schema says
//! `"additionalProperties": true`. Other keywords are refused by [`validate_schema`] so a
//! connector cannot believe something is checked when it is not.

use serde_json::{Map, Value};

const TYPES: [&str; 6] = ["string", "integer", "number", "boolean", "array", "object"];
const TOP_KEYS: [&str; 6] = [
    "type",
    "properties",
    "required",
    "description",
    "additionalProperties",
    "$schema",
];
const PROPERTY_KEYS: [&str; 6] = [
    "type",
    "description",
    "default",
    "enum",
    "minimum",
    "maximum",
];

/// Checks that a settings schema stays within the supported subset (see the module docs).
/// Returns every problem found.
pub fn validate_schema(schema: &Value) -> Result<(), Vec<String>> {
    let mut errors = Vec::new();
    let Some(top) = schema.as_object() else {
        return Err(vec!["settings schema must be a JSON object".into()]);
    };
    for key in top.keys() {
        if !TOP_KEYS.contains(&key.as_str()) {
            errors.push(format!("settings schema: unsupported keyword `{key}`"));
        }
    }
    match top.get("type") {
        Some(Value::String(t)) if t == "object" => {}
        _ => errors.push("settings schema: `type` must be \"object\"".into()),
    }
    if let Some(ap) = top.get("additionalProperties") {
        if !ap.is_boolean() {
            errors.push("settings schema: `additionalProperties` must be true or false".into());
        }
    }
    let empty = Map::new();
    let props = match top.get("properties") {
        None => &empty,
        Some(Value::Object(p)) => p,
        Some(_) => {
            errors.push("settings schema: `properties` must be an object".into());
            &empty
        }
    };
    for (name, prop) in props {
        let Some(prop) = prop.as_object() else {
            errors.push(format!("setting `{name}`: its schema must be an object"));
            continue;
        };
        for key in prop.keys() {
            if !PROPERTY_KEYS.contains(&key.as_str()) {
                errors.push(format!("setting `{name}`: unsupported keyword `{key}`"));
            }
        }
        let ty = match prop.get("type").and_then(Value::as_str) {
            Some(t) if TYPES.contains(&t) => t,
            _ => {
                errors.push(format!(
                    "setting `{name}`: `type` must be one of {}",
                    TYPES.join(", ")
                ));
                continue;
            }
        };
        for bound in ["minimum", "maximum"] {
            if let Some(b) = prop.get(bound) {
                if !b.is_number() || !(ty == "integer" || ty == "number") {
                    errors.push(format!(
                        "setting `{name}`: `{bound}` needs a numeric type and a number"
                    ));
                }
            }
        }
        if let Some(e) = prop.get("enum") {
            match e.as_array() {
                Some(values) if !values.is_empty() => {
                    for v in values {
                        if let Err(msg) = check_value(name, ty, v) {
                            errors.push(format!("{msg} (in `enum`)"));
                        }
                    }
                }
                _ => errors.push(format!(
                    "setting `{name}`: `enum` must be a non-empty array"
                )),
            }
        }
        if let Some(d) = prop.get("default") {
            if let Err(msg) = check_property(name, prop, ty, d) {
                errors.push(format!("{msg} (the default)"));
            }
        }
    }
    match top.get("required") {
        None => {}
        Some(Value::Array(req)) => {
            for r in req {
                match r.as_str() {
                    Some(n) if props.contains_key(n) => {}
                    _ => errors.push(format!(
                        "settings schema: required setting {r} is not declared in `properties`"
                    )),
                }
            }
        }
        Some(_) => errors.push("settings schema: `required` must be an array of names".into()),
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

/// Validates `settings` against `schema` and returns them with declared defaults filled in.
///
/// `null` settings count as `{}`. On failure returns every problem, one sentence each, naming the
/// setting (e.g. ``missing required setting `dir` ``).
pub fn validate_settings(schema: &Value, settings: &Value) -> Result<Value, Vec<String>> {
    validate_schema(schema)?;
    let empty = Map::new();
    let given = match settings {
        Value::Null => &empty,
        Value::Object(m) => m,
        other => {
            return Err(vec![format!(
                "settings must be an object, got {}",
                type_name(other)
            )])
        }
    };
    let top = schema.as_object().expect("checked by validate_schema");
    let props = top
        .get("properties")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    let required: Vec<&str> = top
        .get("required")
        .and_then(Value::as_array)
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let allow_extra = top
        .get("additionalProperties")
        .and_then(Value::as_bool)
        .unwrap_or(false);

    let mut errors = Vec::new();
    let mut out = Map::new();
    for (name, value) in given {
        match props.get(name).and_then(Value::as_object) {
            Some(prop) => {
                let ty = prop.get("type").and_then(Value::as_str).unwrap_or("string");
                match check_property(name, prop, ty, value) {
                    Ok(()) => {
                        out.insert(name.clone(), value.clone());
                    }
                    Err(e) => errors.push(e),
                }
            }
            None if allow_extra => {
                out.insert(name.clone(), value.clone());
            }
            None => {
                let known: Vec<&str> = props.keys().map(String::as_str).collect();
                errors.push(if known.is_empty() {
                    format!("unknown setting `{name}` (this connector takes no settings)")
                } else {
                    format!("unknown setting `{name}` (known: {})", known.join(", "))
                });
            }
        }
    }
    for (name, prop) in props {
        if out.contains_key(name) || given.contains_key(name) {
            continue;
        }
        if let Some(d) = prop.get("default") {
            out.insert(name.clone(), d.clone());
        } else if required.contains(&name.as_str()) {
            errors.push(format!("missing required setting `{name}`"));
        }
    }
    if errors.is_empty() {
        Ok(Value::Object(out))
    } else {
        Err(errors)
    }
}

fn check_property(
    name: &str,
    prop: &Map<String, Value>,
    ty: &str,
    value: &Value,
) -> Result<(), String> {
    check_value(name, ty, value)?;
    if let Some(allowed) = prop.get("enum").and_then(Value::as_array) {
        if !allowed.contains(value) {
            let list: Vec<String> = allowed.iter().map(Value::to_string).collect();
            return Err(format!(
                "setting `{name}` must be one of {}, got {value}",
                list.join(", ")
            ));
        }
    }
    if let Some(n) = value.as_f64() {
        if let Some(min) = prop.get("minimum").and_then(Value::as_f64) {
            if n < min {
                return Err(format!(
                    "setting `{name}` must be at least {}, got {value}",
                    prop["minimum"]
                ));
            }
        }
        if let Some(max) = prop.get("maximum").and_then(Value::as_f64) {
            if n > max {
                return Err(format!(
                    "setting `{name}` must be at most {}, got {value}",
                    prop["maximum"]
                ));
            }
        }
    }
    Ok(())
}

fn check_value(name: &str, ty: &str, value: &Value) -> Result<(), String> {
    let ok = match ty {
        "string" => value.is_string(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        "boolean" => value.is_boolean(),
        "array" => value.is_array(),
        "object" => value.is_object(),
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "setting `{name}` must be {} {ty}, got {}",
            article(ty),
            type_name(value)
        ))
    }
}

fn article(ty: &str) -> &'static str {
    if ty.starts_with(['a', 'i', 'o']) {
        "an"
    } else {
        "a"
    }
}

fn type_name(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("boolean {b}"),
        Value::Number(n) if n.is_f64() => format!("number {n}"),
        Value::Number(n) => format!("integer {n}"),
        Value::String(s) => format!("string {:?}", s),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Value {
        json!({
            "type": "object",
            "properties": {
                "dir": {"type": "string", "description": "drop folder"},
                "batch_size": {"type": "integer", "default": 5000, "minimum": 1, "maximum": 100000},
                "ratio": {"type": "number", "default": 0.5},
                "verbose": {"type": "boolean"},
                "mode": {"type": "string", "enum": ["fast", "slow"], "default": "fast"}
            },
            "required": ["dir"]
        })
    }

    #[test]
    fn defaults_are_filled_in() {
        let v = validate_settings(&schema(), &json!({"dir": "/in"})).unwrap();
        assert_eq!(
            v,
            json!({"dir": "/in", "batch_size": 5000, "ratio": 0.5, "mode": "fast"})
        );
        let v = validate_settings(
            &schema(),
            &json!({"dir": "/in", "batch_size": 10, "ratio": 2, "verbose": true}),
        )
        .unwrap();
        assert_eq!(v["batch_size"], 10);
        assert_eq!(v["ratio"], 2);
        assert_eq!(v["verbose"], true);
    }

    #[test]
    fn every_problem_is_reported() {
        let errs = validate_settings(
            &schema(),
            &json!({"batch_size": 0, "ratio": "x", "verbose": 1, "mode": "medium", "dri": "/in"}),
        )
        .unwrap_err();
        let all = errs.join("\n");
        assert!(all.contains("missing required setting `dir`"), "{all}");
        assert!(
            all.contains("setting `batch_size` must be at least 1, got 0"),
            "{all}"
        );
        assert!(
            all.contains("setting `ratio` must be a number, got string \"x\""),
            "{all}"
        );
        assert!(
            all.contains("setting `verbose` must be a boolean, got integer 1"),
            "{all}"
        );
        assert!(
            all.contains("setting `mode` must be one of \"fast\", \"slow\", got \"medium\""),
            "{all}"
        );
        assert!(all.contains("unknown setting `dri` (known: "), "{all}");
        assert_eq!(errs.len(), 6);
    }

    #[test]
    fn integers_must_be_whole() {
        let errs =
            validate_settings(&schema(), &json!({"dir": "/in", "batch_size": 2.5})).unwrap_err();
        assert_eq!(
            errs,
            vec!["setting `batch_size` must be an integer, got number 2.5"]
        );
    }

    #[test]
    fn null_settings_mean_empty_and_non_objects_are_refused() {
        let s = json!({"type": "object", "properties": {"n": {"type": "integer", "default": 3}}});
        assert_eq!(
            validate_settings(&s, &Value::Null).unwrap(),
            json!({"n": 3})
        );
        assert_eq!(
            validate_settings(&s, &json!([1])).unwrap_err(),
            vec!["settings must be an object, got an array"]
        );
        let none = json!({"type": "object"});
        assert_eq!(
            validate_settings(&none, &json!({"x": 1})).unwrap_err(),
            vec!["unknown setting `x` (this connector takes no settings)"]
        );
        let open = json!({"type": "object", "additionalProperties": true});
        assert_eq!(
            validate_settings(&open, &json!({"x": 1})).unwrap(),
            json!({"x": 1})
        );
    }

    #[test]
    fn schemas_outside_the_subset_are_refused() {
        assert!(validate_schema(&schema()).is_ok());
        let errs = validate_schema(&json!({
            "type": "object",
            "properties": {
                "a": {"type": "strng"},
                "b": {"type": "string", "pattern": "x"},
                "c": {"type": "integer", "default": "five"},
                "d": {"type": "string", "minimum": 3},
                "e": {"type": "string", "enum": []}
            },
            "required": ["a", "zz"],
            "oneOf": []
        }))
        .unwrap_err();
        assert_eq!(errs.len(), 7, "{errs:#?}");
        assert!(validate_schema(&json!({"type": "array"})).is_err());
        assert!(validate_schema(&json!("x")).is_err());
    }
}
