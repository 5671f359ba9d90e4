//! A reader for the Prometheus text exposition format (version 0.0.4), just enough to take
//! gauges off an engine's `/metrics`: sample lines `name{label="value",...} value [timestamp]`,
//! comments and blank lines skipped, label values with `\"`, `\\` and `\n` escapes, and the
//! special values `NaN`, `+Inf` and `-Inf`.

use std::collections::BTreeMap;

/// One sample.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// Metric name.
    pub name: String,
    /// Labels, by name.
    pub labels: BTreeMap<String, String>,
    /// Value.
    pub value: f64,
}

/// Parses an exposition. Lines that do not parse are skipped: one odd line must not hide the
/// other metrics.
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_value(s: &str) -> Option<f64> {
    match s {
        "NaN" => Some(f64::NAN),
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        _ => s.parse().ok(),
    }
}

fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .unwrap_or(line.len());
    let name = &line[..name_end];
    if name.is_empty() {
        return None;
    }
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(body) = rest.strip_prefix('{') {
        let mut chars = body.char_indices().peekable();
        loop {
            while chars
                .peek()
                .is_some_and(|(_, c)| c.is_whitespace() || *c == ',')
            {
                chars.next();
            }
            let (start, c) = *chars.peek()?;
            if c == '}' {
                rest = &body[start + 1..];
                break;
            }
            let eq = body[start..].find('=')? + start;
            let key = body[start..eq].trim().to_string();
            while chars.peek().is_some_and(|(i, _)| *i <= eq) {
                chars.next();
            }
            if chars.next()?.1 != '"' {
                return None;
            }
            let mut value = String::new();
            loop {
                match chars.next()?.1 {
                    '"' => break,
                    '\\' => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        other => value.push(other),
                    },
                    other => value.push(other),
                }
            }
            labels.insert(key, value);
        }
    }
    let value = parse_value(rest.split_whitespace().next()?)?;
    Some(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// Sum of the finite samples named `name`, if there is any.
pub fn sum(samples: &[Sample], name: &str) -> Option<f64> {
    let v: Vec<f64> = samples
        .iter()
        .filter(|s| s.name == name && s.value.is_finite())
        .map(|s| s.value)
        .collect();
    (!v.is_empty()).then(|| v.iter().sum())
}

/// Largest finite sample named `name`, if there is any.
pub fn max(samples: &[Sample], name: &str) -> Option<f64> {
    samples
        .iter()
        .filter(|s| s.name == name && s.value.is_finite())
        .map(|s| s.value)
        .max_by(f64::total_cmp)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENGINE: &str = r#"# HELP vllm:kv_cache_usage_perc Fraction of KV-cache blocks in use (0..1)
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{model_name="deepseek-v3.2"} 0.625
vllm:num_requests_waiting{model_name="deepseek-v3.2"} 3
vllm:num_requests_running{model_name="deepseek-v3.2"} 17
deepseek_engine_kv_cache_projected_usage_perc{model_name="deepseek-v3.2"} 1.25
deepseek_engine_model_load_progress 1
vllm:time_to_first_token_seconds_bucket{model_name="deepseek-v3.2",le="+Inf"} 42
"#;

    #[test]
    fn engine_gauges_are_read_with_their_labels() {
        let s = parse(ENGINE);
        assert_eq!(s.len(), 6);
        assert_eq!(s[0].name, "vllm:kv_cache_usage_perc");
        assert_eq!(s[0].labels["model_name"], "deepseek-v3.2");
        assert_eq!(max(&s, "vllm:kv_cache_usage_perc"), Some(0.625));
        assert_eq!(sum(&s, "vllm:num_requests_running"), Some(17.0));
        assert_eq!(
            max(&s, "deepseek_engine_kv_cache_projected_usage_perc"),
            Some(1.25)
        );
        assert_eq!(max(&s, "deepseek_engine_model_load_progress"), Some(1.0));
        assert_eq!(s[5].labels["le"], "+Inf");
        assert_eq!(sum(&s, "vllm:absent"), None);
    }

    #[test]
    fn escaped_label_values_timestamps_and_special_values_parse() {
        let s = parse(
            "m{a=\"x\\\"y\\\\z\\n\",b=\"1,2}\"} 7 1700000000000\nn NaN\no +Inf\np -Inf\nq 1.5e-3\n",
        );
        assert_eq!(s[0].labels["a"], "x\"y\\z\n");
        assert_eq!(s[0].labels["b"], "1,2}");
        assert_eq!(s[0].value, 7.0);
        assert!(s[1].value.is_nan());
        assert_eq!(s[2].value, f64::INFINITY);
        assert_eq!(s[3].value, f64::NEG_INFINITY);
        assert_eq!(s[4].value, 0.0015);
        assert_eq!(sum(&s, "n"), None, "NaN is no data");
    }

    #[test]
    fn broken_lines_are_skipped_without_hiding_the_others() {
        let s = parse("good 1\nbad{a=\"unterminated 2\nnovalue\n{x=\"1\"} 3\nalso_good{} 4\n");
        let names: Vec<&str> = s.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["good", "also_good"]);
    }
}
