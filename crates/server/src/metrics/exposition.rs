//! The Prometheus text exposition format (0.0.4), written by hand: the
//! format is a few lines of text. Nothing here knows blockrep's metrics: a
//! writer of families (`# HELP`, `# TYPE`, then every sample), sample values,
//! label escaping and histograms.

use std::fmt::Write as _;

/// Content type of the text exposition format.
pub(crate) const CONTENT_TYPE_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A histogram's figures as the format shows them: bucket upper bounds, the
/// observations per bucket (not cumulative; one more than `bounds`, for
/// `+Inf`), their sum and count.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HistogramCounts<'a> {
    pub bounds: &'a [f64],
    pub buckets: &'a [u64],
    pub sum: f64,
    pub count: u64,
}

/// Writes the exposition text: every family's `# HELP` and `# TYPE` once, then
/// all its samples together, as the format requires.
#[derive(Debug, Default)]
pub(crate) struct Exposition {
    out: String,
}

impl Exposition {
    /// A family's `# HELP` and `# TYPE` lines.
    pub(crate) fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    /// One sample line; label values are escaped.
    /// A family of one unlabelled sample.
    pub(crate) fn scalar(&mut self, name: &str, kind: &str, help: &str, value: Value) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }

    pub(crate) fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: Value) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (key, value)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{key}=\"{}\"", escape_label(value));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }

    /// One family with one sample per value of the label `label`.
    pub(crate) fn labelled(
        &mut self,
        name: &str,
        kind: &str,
        help: &str,
        label: &str,
        samples: impl IntoIterator<Item = (String, Value)>,
    ) {
        self.family(name, kind, help);
        for (value_of_label, value) in samples {
            self.sample(name, &[(label, &value_of_label)], value);
        }
    }

    /// The text written so far.
    pub(crate) fn finish(self) -> String {
        self.out
    }

    /// A histogram family: cumulative buckets up to `+Inf`, then the sum and
    /// the count.
    pub(crate) fn histogram(&mut self, name: &str, help: &str, histogram: &HistogramCounts<'_>) {
        self.family(name, "histogram", help);
        let bucket = format!("{name}_bucket");
        let mut cumulative = 0;
        for (i, &bound) in histogram.bounds.iter().enumerate() {
            cumulative += histogram.buckets.get(i).copied().unwrap_or(0);
            let le = Value::Float(bound).to_string();
            self.sample(&bucket, &[("le", &le)], Value::Int(cumulative));
        }
        self.sample(&bucket, &[("le", "+Inf")], Value::Int(histogram.count));
        self.sample(&format!("{name}_sum"), &[], Value::Float(histogram.sum));
        self.sample(&format!("{name}_count"), &[], Value::Int(histogram.count));
    }
}

/// A sample value: integers stay exact (an `f64` loses counts past 2^53).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Value {
    /// A count or a size.
    Int(u64),
    /// Seconds, ratios, rates.
    Float(f64),
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Value::Int(n) => write!(f, "{n}"),
            Value::Float(x) if x.is_nan() => f.write_str("NaN"),
            Value::Float(x) if x == f64::INFINITY => f.write_str("+Inf"),
            Value::Float(x) if x == f64::NEG_INFINITY => f.write_str("-Inf"),
            Value::Float(x) => write!(f, "{x}"),
        }
    }
}

fn escape_help(text: &str) -> String {
    text.replace('\\', "\\\\").replace('\n', "\\n")
}

pub(crate) fn escape_label(text: &str) -> String {
    text.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_end_at_inf() {
        let mut x = Exposition::default();
        let counts = HistogramCounts {
            bounds: &[1.0, 10.0],
            buckets: &[2, 1, 1],
            sum: 56.5,
            count: 4,
        };
        x.histogram("h_seconds", "help", &counts);
        assert_eq!(
            x.finish(),
            "# HELP h_seconds help\n# TYPE h_seconds histogram\n\
             h_seconds_bucket{le=\"1\"} 2\nh_seconds_bucket{le=\"10\"} 3\n\
             h_seconds_bucket{le=\"+Inf\"} 4\nh_seconds_sum 56.5\nh_seconds_count 4\n"
        );
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
