//! Reading values out of the Prometheus text exposition format (what `/metrics` serves), for
//! tests that scrape a daemon instead of holding its registry (child processes).

/// The value of exactly the series `series` (`name` or `name{labels}` as printed), if present.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// The sum of every series of the family `name` (0 when absent).
pub fn family_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            let value = match rest.strip_prefix('{') {
                Some(labelled) => labelled.rsplit_once("} ")?.1,
                None => rest.strip_prefix(' ')?,
            };
            value.trim().parse::<f64>().ok()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP a_total x\n# TYPE a_total counter\na_total 3\n\
                        b_total{reason=\"fin\"} 2\nb_total{reason=\"reset\"} 5\nb_total_x 100\n";

    #[test]
    fn samples_and_sums() {
        assert_eq!(sample(TEXT, "a_total"), Some(3.0));
        assert_eq!(sample(TEXT, "b_total{reason=\"reset\"}"), Some(5.0));
        assert_eq!(sample(TEXT, "b_total"), None);
        assert_eq!(family_sum(TEXT, "b_total"), 7.0);
        assert_eq!(family_sum(TEXT, "missing"), 0.0);
    }
}
