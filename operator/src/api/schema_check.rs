//! A small OpenAPI v3 validator for CRD schemas, as the API server applies them: defaults,
//! then types, required fields, enums, numeric ranges, string and list lengths, unknown fields
//! (pruned by the server; refused here so typos in examples are caught), then the CEL
//! `x-kubernetes-validations` rules through kube's client-side CEL evaluator.

use kube::CustomResourceExt;
use serde_json::Value;

use super::DeepSeekDeployment;

/// The `openAPIV3Schema` of the generated CRD, as JSON.
pub fn crd_schema() -> Value {
    let crd = DeepSeekDeployment::crd();
    let schema = crd.spec.versions[0]
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .expect("the CRD has a schema");
    serde_json::to_value(schema).expect("schema to JSON")
}

/// Applies schema defaults, then checks structure and CEL rules. Returns every problem found,
/// each starting with the JSON path.
pub fn validate_object(schema: &Value, object: &Value) -> Result<Value, Vec<String>> {
    let defaulted = kube::core::cel::apply_defaults(schema, object);
    let mut errors = Vec::new();
    check(schema, &defaulted, "", &mut errors);
    if let Err(e) = kube::core::cel::Validator::new().validate(schema, &defaulted, None) {
        errors.extend(e.iter().map(ToString::to_string));
    }
    if errors.is_empty() {
        Ok(defaulted)
    } else {
        Err(errors)
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn check(schema: &Value, value: &Value, path: &str, errors: &mut Vec<String>) {
    let at = if path.is_empty() { "<root>" } else { path };
    if value.is_null() {
        if schema.get("nullable") != Some(&Value::Bool(true)) {
            errors.push(format!("{at}: must not be null"));
        }
        return;
    }
    if schema.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true)) {
        if !(value.is_string() || value.is_i64() || value.is_u64()) {
            errors.push(format!("{at}: must be an integer or a string"));
        }
        return;
    }
    if let Some(t) = schema.get("type").and_then(Value::as_str) {
        let actual = type_name(value);
        let ok = actual == t || (t == "number" && actual == "integer");
        if !ok {
            errors.push(format!("{at}: must be of type {t}, got {actual}"));
            return;
        }
    }
    if let Some(options) = schema.get("enum").and_then(Value::as_array)
        && !options.contains(value)
    {
        errors.push(format!(
            "{at}: unsupported value {value}: supported values: {options:?}"
        ));
    }
    if let Some(x) = value.as_f64() {
        if let Some(min) = schema.get("minimum").and_then(Value::as_f64)
            && x < min
        {
            errors.push(format!("{at}: must be greater than or equal to {min}"));
        }
        if let Some(max) = schema.get("maximum").and_then(Value::as_f64)
            && x > max
        {
            errors.push(format!("{at}: must be less than or equal to {max}"));
        }
    }
    if let Some(s) = value.as_str() {
        let n = s.chars().count() as u64;
        if let Some(min) = schema.get("minLength").and_then(Value::as_u64)
            && n < min
        {
            errors.push(format!("{at}: must be at least {min} characters"));
        }
        if let Some(max) = schema.get("maxLength").and_then(Value::as_u64)
            && n > max
        {
            errors.push(format!("{at}: must be at most {max} characters"));
        }
    }
    if let Some(items) = value.as_array() {
        if let Some(max) = schema.get("maxItems").and_then(Value::as_u64)
            && items.len() as u64 > max
        {
            errors.push(format!("{at}: must have at most {max} items"));
        }
        if let Some(item_schema) = schema.get("items") {
            for (i, item) in items.iter().enumerate() {
                check(item_schema, item, &format!("{path}[{i}]"), errors);
            }
        }
    }
    if let Some(obj) = value.as_object() {
        if let Some(required) = schema.get("required").and_then(Value::as_array) {
            for r in required.iter().filter_map(Value::as_str) {
                if !obj.contains_key(r) {
                    errors.push(format!("{}: Required value", join(path, r)));
                }
            }
        }
        let props = schema.get("properties").and_then(Value::as_object);
        let additional = schema.get("additionalProperties");
        let preserve =
            schema.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
        for (k, v) in obj {
            let child = join(path, k);
            if let Some(s) = props.and_then(|p| p.get(k)) {
                check(s, v, &child, errors);
            } else if let Some(s) = additional.filter(|a| a.is_object()) {
                check(s, v, &child, errors);
            } else if path.is_empty() && ["apiVersion", "kind", "metadata"].contains(&k.as_str()) {
                // Every object has these; the API server checks them itself.
            } else if props.is_some()
                && !preserve
                && path != "metadata"
                && !path.starts_with("metadata.")
            {
                errors.push(format!("{child}: unknown field"));
            }
        }
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// Every schema node that lacks a type, excluding the int-or-string and preserve-unknown forms
/// Kubernetes allows. A structural schema has none.
pub fn untyped_nodes(schema: &Value, path: &str, out: &mut Vec<String>) {
    let Some(obj) = schema.as_object() else {
        return;
    };
    let special = obj.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true))
        || obj.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
    if !obj.contains_key("type") && !special {
        out.push(if path.is_empty() {
            "<root>".into()
        } else {
            path.to_string()
        });
    }
    for forbidden in ["oneOf", "anyOf", "allOf", "not", "$ref"] {
        if obj.contains_key(forbidden) {
            out.push(format!("{path}: uses {forbidden}"));
        }
    }
    if let Some(props) = obj.get("properties").and_then(Value::as_object) {
        for (k, v) in props {
            untyped_nodes(v, &join(path, k), out);
        }
    }
    if let Some(items) = obj.get("items") {
        untyped_nodes(items, &format!("{path}[]"), out);
    }
    if let Some(add) = obj.get("additionalProperties").filter(|a| a.is_object()) {
        untyped_nodes(add, &format!("{path}{{}}"), out);
    }
}
