//! Reading Prometheus/OpenMetrics text: samples with their labels, and
//! quantiles from histogram buckets.

use std::collections::BTreeMap;

#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Every sample of an exposition.
#[derive(Debug, Clone, Default)]
pub struct Exposition {
    pub samples: Vec<Sample>,
}

impl Exposition {
    pub fn parse(text: &str) -> Self {
        let samples =
            text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()).filter_map(parse_line).collect();
        Self { samples }
    }

    /// Sum of the samples named `name` whose labels include all of `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(|s| s.value).sum()
    }

    pub fn matching<'a>(&'a self, name: &'a str, labels: &'a [(&str, &str)]) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| {
            s.name == name && labels.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }
}

fn parse_line(line: &str) -> Option<Sample> {
    let (series, rest) = match line.find('{') {
        Some(_) => {
            let close = line.rfind('}')?;
            (&line[..close + 1], &line[close + 1..])
        }
        None => line.split_at(line.find(' ')?),
    };
    let value = rest.split_whitespace().next()?.parse().ok()?;
    let (name, labels) = match series.find('{') {
        Some(open) => (&series[..open], parse_labels(&series[open + 1..series.len() - 1])),
        None => (series, BTreeMap::new()),
    };
    Some(Sample { name: name.to_string(), labels, value })
}

fn parse_labels(s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = s;
    while let Some(eq) = rest.find("=\"") {
        let key = rest[..eq].trim_start_matches(',').trim().to_string();
        let after = &rest[eq + 2..];
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, n)) = chars.next() {
                        value.push(if n == 'n' { '\n' } else { n });
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        out.insert(key, value);
        rest = &after[end..];
    }
    out
}

/// The `q` quantile of cumulative histogram buckets (upper bound, count),
/// interpolated inside the bucket as Prometheus' histogram_quantile does.
pub fn quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let mut buckets = buckets.to_vec();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut prev = (0.0, 0.0);
    for &(le, count) in &buckets {
        if count >= rank {
            if le.is_infinite() {
                return Some(prev.0);
            }
            let width = le - prev.0;
            let in_bucket = count - prev.1;
            let frac = if in_bucket > 0.0 { (rank - prev.1) / in_bucket } else { 1.0 };
            return Some(prev.0 + width * frac);
        }
        prev = (le, count);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_labels_and_values() {
        let m =
            Exposition::parse("# TYPE x counter\nx_total{a=\"1\",b=\"q\\\"z\"} 3\nx_total{a=\"2\",b=\"c\"} 4\ny 1.5\n");
        assert_eq!(m.sum("x_total", &[]), 7.0);
        assert_eq!(m.sum("x_total", &[("a", "1")]), 3.0);
        assert_eq!(m.sum("x_total", &[("b", "q\"z")]), 3.0);
        assert_eq!(m.sum("y", &[]), 1.5);
    }

    #[test]
    fn quantiles_interpolate_within_buckets() {
        let b = [(0.001, 50.0), (0.002, 100.0), (f64::INFINITY, 100.0)];
        let p50 = quantile(0.5, &b).expect("p50");
        assert!((p50 - 0.001).abs() < 1e-9, "{p50}");
        let p75 = quantile(0.75, &b).expect("p75");
        assert!((p75 - 0.0015).abs() < 1e-9, "{p75}");
        assert_eq!(quantile(0.5, &[(1.0, 0.0)]), None);
    }
}
