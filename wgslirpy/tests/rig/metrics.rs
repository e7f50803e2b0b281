//! Scraping the gateway's `--metrics` server from inside its namespace.

use super::Rig;

/// Where a test's metrics server listens, inside the gateway's namespace.
pub const METRICS: &str = "127.0.0.1:9100";

impl Rig {
    /// `curl` of `path` on the metrics server at [`METRICS`], from the gateway's
    /// namespace: (status and content type, body).
    pub fn scrape(&self, path: &str) -> (String, String) {
        let url = format!("http://{METRICS}{path}");
        let out = self.gw.run(&[
            "curl",
            "-s",
            "-m",
            "5",
            "-o",
            "-",
            "-w",
            "\n%{http_code} %{content_type}",
            &url,
        ]);
        let (body, status) = out
            .stdout
            .rsplit_once('\n')
            .unwrap_or_else(|| panic!("curl {url}: {out}"));
        (status.to_owned(), body.to_owned())
    }
}

/// The value of the sample `name{labels}` in an exposition (labels as written, or "" for
/// none).
pub fn sample(body: &str, name: &str, labels: &str) -> f64 {
    let key = if labels.is_empty() {
        name.to_owned()
    } else {
        format!("{name}{{{labels}}}")
    };
    body.lines()
        .find_map(|line| line.strip_prefix(&key)?.strip_prefix(' '))
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("no sample {key} in\n{body}"))
}
