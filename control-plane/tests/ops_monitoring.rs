#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The monitoring files of `ops/` checked as Prometheus and Grafana would read them, against
//! the real binaries:
//!
//! * `promtool check rules` and `promtool test rules` on `ops/prometheus/alerts.yml` (with its
//!   unit tests, `alerts.test.yml`, which must make each alert fire and stay quiet),
//!   `promtool check config` on `ops/prometheus/prometheus.yml`; every alert has a severity,
//!   a summary and a description;
//! * the Grafana dashboard `ops/grafana/dashboards/edgeplane-fleet.json` loads (valid JSON,
//!   unique panel ids, a place on the grid for each panel without overlaps, targets with
//!   unique `refId`s, the `${datasource}` variable, no undefined variable) and every query
//!   parses (`promtool check rules` on a throwaway file of recording rules);
//! * every metric the dashboard and the alerts name is exported by a real `control-plane`
//!   (embedded store, with an edge stack so per-stack series exist) or a real
//!   `tunnel-gateway` (on a throwaway Redis), and `promtool check metrics` finds no error in
//!   their scrapes (its lint warnings are printed, not failed on).
//!
//! promtool comes with Debian's `prometheus` package (`scripts/test` installs it); without it
//! these tests fail, they never pass silently. Run alone:
//! `cargo test -p control-plane --test ops_monitoring`.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};
use testkit::{CpProcess, GatewayArgs, GatewayProcess, RedisServer, TestCert};

const ALERTS: &str = "ops/prometheus/alerts.yml";
const ALERT_TESTS: &str = "ops/prometheus/alerts.test.yml";
const PROMETHEUS: &str = "ops/prometheus/prometheus.yml";
const DASHBOARD: &str = "ops/grafana/dashboards/edgeplane-fleet.json";

/// Series every Prometheus has without any exporter: they are not ours to export.
const PROMETHEUS_OWN: &[&str] = &["up"];

/// Grafana's built-in variables, with a value of the right kind for checking a query.
const GRAFANA_BUILTINS: &[(&str, &str)] = &[
    ("__rate_interval", "5m"),
    ("__interval", "1m"),
    ("__range", "1h"),
    ("__interval_ms", "60000"),
    ("__range_s", "3600"),
    ("__range_ms", "3600000"),
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .to_owned()
}

// ------------------------------------------------------------------------------------------
// promtool

/// Runs `promtool args` in the workspace root, with `stdin` if given. A missing promtool
/// fails the test with how to install it.
fn promtool(args: &[&str], stdin: Option<&str>) -> Output {
    let mut cmd = Command::new("promtool");
    cmd.args(args)
        .current_dir(root())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "`promtool` is not installed (not found on PATH); the monitoring tests need it: \
             install Debian's `prometheus` package (`apt-get install -y prometheus`; \
             scripts/test installs it)"
        ),
        Err(e) => panic!("cannot run promtool: {e}"),
    };
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("promtool's stdin");
        // promtool may stop reading at a parse error: a broken pipe is its answer, not ours.
        let _ = pipe.write_all(input.as_bytes());
    }
    child.wait_with_output().expect("promtool's output")
}

fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `promtool args` must succeed; else the test fails with promtool's own words.
fn promtool_ok(args: &[&str]) {
    let out = promtool(args, None);
    assert!(
        out.status.success(),
        "promtool {} failed ({}):\n{}",
        args.join(" "),
        out.status,
        output_text(&out)
    );
}

#[test]
fn alert_rules_and_scrape_config_pass_promtool() {
    promtool_ok(&["check", "rules", ALERTS]);
    promtool_ok(&["test", "rules", ALERT_TESTS]);
    promtool_ok(&["check", "config", PROMETHEUS]);
}

/// Every alert says how bad it is and what happened, for whoever is paged.
#[test]
fn every_alert_has_a_severity_a_summary_and_a_description() {
    let mut problems = Vec::new();
    for (name, rule) in alert_rules() {
        let severity = rule["labels"]["severity"].as_str().unwrap_or_default();
        if !["critical", "warning", "info"].contains(&severity) {
            problems.push(format!(
                "{name}: labels.severity is {severity:?}, not critical, warning or info"
            ));
        }
        for field in ["summary", "description"] {
            if rule["annotations"][field]
                .as_str()
                .is_none_or(|s| s.trim().is_empty())
            {
                problems.push(format!("{name}: no annotations.{field}"));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Each alert has a unit test where it fires and one where it must not: a rule broken either
/// way (never firing, or firing on everything) fails `promtool test rules`.
#[test]
fn every_alert_is_unit_tested_firing_and_not_firing() {
    let text = std::fs::read_to_string(root().join(ALERT_TESTS)).expect("read alerts.test.yml");
    let doc: Value = serde_yaml::from_str(&text).expect("alerts.test.yml is YAML");
    // alert name -> (has a case that fires, has a case that does not)
    let mut cases: BTreeMap<String, (bool, bool)> = BTreeMap::new();
    for test in doc["tests"].as_array().expect("alerts.test.yml: tests") {
        for case in test["alert_rule_test"].as_array().into_iter().flatten() {
            let name = case["alertname"].as_str().unwrap_or_default().to_owned();
            let fires = case["exp_alerts"].as_array().is_some_and(|a| !a.is_empty());
            let entry = cases.entry(name).or_default();
            if fires {
                entry.0 = true;
            } else {
                entry.1 = true;
            }
        }
    }
    let mut problems = Vec::new();
    for (name, _) in alert_rules() {
        match cases.get(&name) {
            Some((true, true)) => {}
            Some((fires, _)) => problems.push(format!(
                "{name}: no case where it {}",
                if *fires { "stays quiet" } else { "fires" }
            )),
            None => problems.push(format!("{name}: not tested")),
        }
    }
    assert!(
        problems.is_empty(),
        "{ALERT_TESTS} must test every alert of {ALERTS} both ways:\n{}",
        problems.join("\n")
    );
}

/// (name, rule) of every alerting rule of `alerts.yml`, as JSON values.
fn alert_rules() -> Vec<(String, Value)> {
    let text = std::fs::read_to_string(root().join(ALERTS)).expect("read alerts.yml");
    let doc: Value = serde_yaml::from_str(&text).expect("alerts.yml is YAML");
    let mut out = Vec::new();
    for group in doc["groups"].as_array().expect("alerts.yml: groups") {
        for rule in group["rules"].as_array().expect("alerts.yml: rules") {
            if let Some(name) = rule["alert"].as_str() {
                out.push((name.to_owned(), rule.clone()));
            }
        }
    }
    assert!(!out.is_empty(), "alerts.yml holds no alert");
    out
}

/// (where, PromQL) of every rule of `alerts.yml`.
fn alert_exprs() -> Vec<(String, String)> {
    alert_rules()
        .into_iter()
        .map(|(name, rule)| {
            let expr = rule["expr"].as_str().expect("an alert's expr").to_owned();
            (format!("alert {name}"), expr)
        })
        .collect()
}

// ------------------------------------------------------------------------------------------
// the dashboard

fn dashboard() -> Value {
    let text = std::fs::read_to_string(root().join(DASHBOARD)).expect("read the dashboard");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{DASHBOARD} is not valid JSON: {e}"))
}

/// Every panel, those inside collapsed rows included.
fn panels(dashboard: &Value) -> Vec<Value> {
    let mut out = Vec::new();
    for p in dashboard["panels"]
        .as_array()
        .expect("the dashboard's panels")
    {
        out.push(p.clone());
        if let Some(inner) = p["panels"].as_array() {
            out.extend(inner.iter().cloned());
        }
    }
    out
}

/// The names of the dashboard's template variables.
fn variables(dashboard: &Value) -> BTreeSet<String> {
    dashboard["templating"]["list"]
        .as_array()
        .map(|l| {
            l.iter()
                .filter_map(|v| v["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// `text` with every Grafana variable replaced: built-ins by a value of their kind, the
/// dashboard's own by `.*` (they belong inside a label matcher's quotes: used anywhere else,
/// the query no longer parses and the test says so). Variables the dashboard does not define
/// are added to `undefined`.
fn substitute(text: &str, defined: &BTreeSet<String>, undefined: &mut BTreeSet<String>) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let (name, used) = if let Some(braced) = after.strip_prefix('{') {
            let end = braced.find('}').unwrap_or(braced.len());
            let inner = &braced[..end];
            // `${name:format}`
            let name = inner.split(':').next().unwrap_or_default();
            (name, end + 2)
        } else {
            let end = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            (&after[..end], end)
        };
        if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
            // A lone `$`, or a regex group (`$1`) Grafana leaves alone.
            out.push('$');
            rest = after;
            continue;
        }
        match GRAFANA_BUILTINS.iter().find(|(b, _)| *b == name) {
            Some((_, value)) => out.push_str(value),
            None => {
                if !defined.contains(name) {
                    undefined.insert(name.to_owned());
                }
                out.push_str(".*");
            }
        }
        rest = &after[used.min(after.len())..];
    }
    out.push_str(rest);
    out
}

/// (where, PromQL with variables substituted) of every query of the dashboard: panel
/// targets, and the selectors of query variables (`label_values(selector, label)`,
/// `query_result(expr)`). Problems with the dashboard's variables go to `problems`.
fn dashboard_exprs(dashboard: &Value, problems: &mut Vec<String>) -> Vec<(String, String)> {
    let defined = variables(dashboard);
    let mut undefined = BTreeSet::new();
    let mut out = Vec::new();
    for p in panels(dashboard) {
        let id = p["id"].as_u64().unwrap_or_default();
        for t in p["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = t["expr"].as_str() {
                let refid = t["refId"].as_str().unwrap_or("?");
                out.push((
                    format!("panel {id} {} target {refid}", p["title"]),
                    substitute(expr, &defined, &mut undefined),
                ));
            }
        }
    }
    for v in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if v["type"] != "query" {
            continue;
        }
        let query = v["query"]["query"]
            .as_str()
            .or_else(|| v["query"].as_str())
            .unwrap_or_default();
        let query = substitute(query, &defined, &mut undefined);
        let selector = if let Some(args) = query
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
        {
            // label_values(label) names no metric; label_values(selector, label) does.
            args.rsplit_once(',').map(|(sel, _)| sel.trim().to_owned())
        } else {
            query
                .strip_prefix("query_result(")
                .and_then(|q| q.strip_suffix(')'))
                .map(str::to_owned)
        };
        if let Some(selector) = selector {
            out.push((format!("variable {}", v["name"]), selector));
        }
    }
    for name in undefined {
        problems.push(format!(
            "the dashboard uses ${name}, which is neither a template variable nor Grafana's"
        ));
    }
    out
}

/// What Grafana needs to load the dashboard and what provisioning it relies on.
fn dashboard_problems(dashboard: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    if dashboard["schemaVersion"].as_u64().is_none() {
        problems.push("no schemaVersion".to_owned());
    }
    for field in ["uid", "title"] {
        if dashboard[field].as_str().is_none_or(str::is_empty) {
            problems.push(format!("no {field}"));
        }
    }
    let datasource_variable = dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|v| {
            v["name"] == "datasource" && v["type"] == "datasource" && v["query"] == "prometheus"
        });
    if !datasource_variable {
        problems.push(
            "no template variable `datasource` of type datasource (query: prometheus)".to_owned(),
        );
    }
    let mut ids = BTreeSet::new();
    let mut boxes: Vec<(u64, [u64; 4])> = Vec::new();
    for p in panels(dashboard) {
        let title = p["title"].as_str().unwrap_or_default();
        let Some(id) = p["id"].as_u64() else {
            problems.push(format!("panel {title:?} has no numeric id"));
            continue;
        };
        if !ids.insert(id) {
            problems.push(format!("panel id {id} is used twice"));
        }
        if p["type"].as_str().is_none_or(str::is_empty) {
            problems.push(format!("panel {id} has no type"));
        }
        let g = &p["gridPos"];
        let pos: Option<Vec<u64>> = ["x", "y", "w", "h"]
            .iter()
            .map(|k| g[*k].as_u64())
            .collect();
        match pos.as_deref() {
            Some(&[x, y, w, h]) if w > 0 && h > 0 && x + w <= 24 => {
                for (other, [ox, oy, ow, oh]) in &boxes {
                    if x < ox + ow && *ox < x + w && y < oy + oh && *oy < y + h {
                        problems.push(format!("panels {other} and {id} overlap on the grid"));
                    }
                }
                boxes.push((id, [x, y, w, h]));
            }
            _ => problems.push(format!(
                "panel {id} has no valid gridPos (x, y, w, h; w, h > 0; x + w <= 24): {g}"
            )),
        }
        if p["type"] == "row" {
            continue;
        }
        if p["datasource"]["uid"] != "${datasource}" {
            problems.push(format!(
                "panel {id}: datasource is {}, not the ${{datasource}} variable",
                p["datasource"]
            ));
        }
        let targets = p["targets"].as_array().cloned().unwrap_or_default();
        if targets.is_empty() {
            problems.push(format!("panel {id} has no targets"));
        }
        let mut refids = BTreeSet::new();
        for t in &targets {
            match t["refId"].as_str() {
                Some(r) if !r.is_empty() => {
                    if !refids.insert(r.to_owned()) {
                        problems.push(format!("panel {id}: refId {r} is used twice"));
                    }
                }
                _ => problems.push(format!("panel {id}: a target without refId")),
            }
            if t["expr"].as_str().is_none_or(|e| e.trim().is_empty()) {
                problems.push(format!("panel {id}: a target without expr"));
            }
            if !t["datasource"].is_null() && t["datasource"]["uid"] != "${datasource}" {
                problems.push(format!(
                    "panel {id}: a target's datasource is {}, not ${{datasource}}",
                    t["datasource"]
                ));
            }
        }
    }
    problems
}

#[test]
fn dashboard_loads_and_its_queries_parse() {
    let dashboard = dashboard();
    let mut problems = dashboard_problems(&dashboard);
    let exprs = dashboard_exprs(&dashboard, &mut problems);
    assert!(problems.is_empty(), "{DASHBOARD}:\n{}", problems.join("\n"));
    assert!(!exprs.is_empty(), "the dashboard has no query");

    // Each query as a recording rule: promtool parses it as Prometheus would (names say
    // where each comes from, so promtool's errors do).
    let rules: Vec<Value> = exprs
        .iter()
        .enumerate()
        .map(|(i, (place, expr))| {
            json!({
                "record": format!("dashboard:query_{i}"),
                "expr": expr,
                "labels": {"from": place},
            })
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dashboard-queries.yml");
    // JSON is YAML.
    std::fs::write(
        &file,
        serde_json::to_string_pretty(&json!({"groups": [{"name": "dashboard", "rules": rules}]}))
            .unwrap(),
    )
    .unwrap();
    let out = promtool(&["check", "rules", &file.display().to_string()], None);
    assert!(
        out.status.success(),
        "a query of {DASHBOARD} does not parse (query_N is the Nth of):\n{}\n\npromtool:\n{}",
        exprs
            .iter()
            .enumerate()
            .map(|(i, (place, expr))| format!("  query_{i}: {place}: {expr}"))
            .collect::<Vec<_>>()
            .join("\n"),
        output_text(&out)
    );
}

// ------------------------------------------------------------------------------------------
// metric names in PromQL

const AGGREGATIONS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
];
/// Followed by a list of label names in parentheses.
const LABEL_LISTS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];
const KEYWORDS: &[&str] = &[
    "and", "or", "unless", "bool", "offset", "atan2", "inf", "nan", "start", "end",
];

/// The metric names a PromQL expression selects: identifiers outside label matchers (`{...}`),
/// ranges (`[...]`) and strings that are not a function, an aggregation, a keyword or a label
/// list (`by (le)`). `__name__` matchers are reported as a name of their own, so that a test
/// asks for the metric to be named directly.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut depth = 0usize; // inside {...} or [...]
    let mut i = 0;
    let ident_start = |c: char| c.is_ascii_alphabetic() || c == '_' || c == ':';
    let ident_char = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    while i < chars.len() {
        let c = chars[i];
        match c {
            '"' | '\'' | '`' => {
                // A string: skipped, escapes included (none in backquoted ones).
                i += 1;
                while i < chars.len() && chars[i] != c {
                    if chars[i] == '\\' && c != '`' {
                        i += 1;
                    }
                    i += 1;
                }
                i += 1;
            }
            '{' | '[' => {
                depth += 1;
                i += 1;
            }
            '}' | ']' => {
                depth = depth.saturating_sub(1);
                i += 1;
            }
            '#' => {
                // A comment, to the end of the line.
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
            }
            c if c.is_ascii_digit()
                || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit)) =>
            {
                // A number or a duration (5m, 1.5e3, 0x1f, 1h30m).
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                    i += 1;
                }
            }
            c if ident_start(c) => {
                let start = i;
                while i < chars.len() && ident_char(chars[i]) {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                if depth > 0 {
                    if word == "__name__" {
                        names.insert("__name__".to_owned());
                    }
                    continue;
                }
                let mut next = i;
                while next < chars.len() && chars[next].is_whitespace() {
                    next += 1;
                }
                let paren = chars.get(next) == Some(&'(');
                let lower = word.to_ascii_lowercase();
                if LABEL_LISTS.contains(&lower.as_str()) {
                    if paren {
                        // Skip the label names up to the closing parenthesis.
                        while next < chars.len() && chars[next] != ')' {
                            next += 1;
                        }
                        i = next + 1;
                    }
                } else if AGGREGATIONS.contains(&lower.as_str())
                    || KEYWORDS.contains(&lower.as_str())
                    || paren
                {
                    // An aggregation, a keyword or a function.
                } else {
                    names.insert(word);
                }
            }
            _ => i += 1,
        }
    }
    names
}

#[test]
fn metric_names_are_what_queries_select() {
    let names = |e: &str| metric_names(e).into_iter().collect::<Vec<_>>();
    assert_eq!(
        names(r#"histogram_quantile(0.9, sum by (le) (rate(a_bucket{le!="+Inf"}[5m]))) > 5"#),
        ["a_bucket"]
    );
    assert_eq!(
        names(concat!(
            "sum without (instance) (increase(b_total[5m] offset 1h))",
            " / on (job) group_left (version) c_info or vector(0)"
        )),
        ["b_total", "c_info"]
    );
    assert_eq!(
        names(r#"count(time() - max by (x) (d) > 300) and up{job="by"} == bool 1"#),
        ["d", "up"]
    );
    assert_eq!(names(r#"topk(3, e) unless f[1h:5m]"#), ["e", "f"]);
    assert_eq!(
        names(r#"g{__name__=~"h.*"} + 1.5e3 + 0x1f"#),
        ["__name__", "g"]
    );
    assert_eq!(names("sum(rate(i[5m])) # j is a comment"), ["i"]);
}

// ------------------------------------------------------------------------------------------
// what the binaries export

/// What one scrape shows: sample names, and families declared by `# TYPE` with their type.
#[derive(Default)]
struct Exposition {
    samples: BTreeSet<String>,
    families: BTreeMap<String, String>,
}

impl Exposition {
    fn add(&mut self, text: &str) {
        for line in text.lines() {
            if let Some(decl) = line.strip_prefix("# TYPE ") {
                let mut parts = decl.split_whitespace();
                if let (Some(name), Some(kind)) = (parts.next(), parts.next()) {
                    self.families.insert(name.to_owned(), kind.to_owned());
                }
            } else if !line.starts_with('#') && !line.trim().is_empty() {
                let end = line.find(['{', ' ']).unwrap_or(line.len());
                self.samples.insert(line[..end].to_owned());
            }
        }
    }

    /// Whether a query naming `name` selects series from this exposition: a sample of that
    /// name, a family declared without samples yet (`# TYPE`, e.g. per-agent series before
    /// any agent), or a histogram's (a summary's) `_bucket`, `_sum`, `_count` series. A
    /// histogram's own name selects nothing: there is no such series.
    fn exports(&self, name: &str) -> bool {
        if self.samples.contains(name) {
            return true;
        }
        if let Some(kind) = self.families.get(name) {
            return !matches!(kind.as_str(), "histogram" | "summary");
        }
        [
            ("_bucket", &["histogram"][..]),
            ("_sum", &["histogram", "summary"][..]),
            ("_count", &["histogram", "summary"][..]),
        ]
        .iter()
        .any(|(suffix, kinds)| {
            name.strip_suffix(suffix)
                .and_then(|base| self.families.get(base))
                .is_some_and(|kind| kinds.contains(&kind.as_str()))
        })
    }
}

async fn scrape(url: &str) -> String {
    let r = testkit::http()
        .get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("scrape {url}: {e}"));
    assert!(r.status().is_success(), "scrape {url}: {}", r.status());
    r.text().await.expect("scrape text")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_alerts_name_metrics_the_binaries_export() {
    testkit::api::install_crypto();
    // Before anything starts: without promtool this test fails here, with how to install it.
    let version = promtool(&["--version"], None);
    assert!(version.status.success(), "{}", output_text(&version));

    // A real control plane (embedded store, embedded gateway) with one edge stack, so that
    // its per-stack series exist.
    let data = tempfile::tempdir().unwrap();
    let tunnel = format!("127.0.0.1:{}", testkit::free_port());
    let cp = CpProcess::spawn(data.path(), &["--tunnel-addr", &tunnel]).await;
    let client = testkit::http();
    let (status, group) = testkit::api::admin_json(
        &client,
        Method::POST,
        &cp.api("/api/edge_groups"),
        &json!({"name": "ops-monitoring"}),
    )
    .await;
    assert_eq!(status, reqwest::StatusCode::CREATED, "{group}");
    let (status, stack) = testkit::api::admin_json(
        &client,
        Method::POST,
        &cp.api("/api/edge_stacks"),
        &json!({
            "name": "ops-monitoring",
            "compose": "services:\n  web:\n    image: nginx:1.27\n",
            "edgeGroupIds": [group["id"]],
        }),
    )
    .await;
    assert_eq!(status, reqwest::StatusCode::CREATED, "{stack}");

    // A real tunnel gateway on a throwaway Redis.
    let redis = RedisServer::start();
    let cert = TestCert::generate();
    let gw = GatewayProcess::start(&GatewayArgs {
        id: "gw-ops".to_owned(),
        port: 0,
        redis_url: redis.url(),
        redis_prefix: "edgeplane:".to_owned(),
        cert: cert.cert.clone(),
        key: cert.key.clone(),
        lease: "15s".to_owned(),
        rust_log: "warn".to_owned(),
    })
    .await;

    // The per-stack status gauges are read every 10 s by the rollout controller.
    let cp_metrics = format!("{}/metrics", cp.metrics_url);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut cp_text = scrape(&cp_metrics).await;
    while !cp_text.contains("edgeplane_edge_stack_environments{")
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(500)).await;
        cp_text = scrape(&cp_metrics).await;
    }
    let scrapes = [
        ("control-plane /metrics", cp_text),
        (
            "control-plane /metrics/agents",
            scrape(&format!(
                "{}/metrics/agents?shard=0&shards=1",
                cp.metrics_url
            ))
            .await,
        ),
        (
            "tunnel-gateway /metrics",
            scrape(&format!("http://{}/metrics", gw.metrics)).await,
        ),
    ];

    let mut failures = Vec::new();

    // The scrapes as Prometheus parses them: errors fail, lint warnings are shown.
    for (what, text) in &scrapes {
        let out = promtool(&["check", "metrics"], Some(text.as_str()));
        match out.status.code() {
            Some(0) => {}
            // 3: lint problems only (names, units, help texts): reported, not failed on.
            Some(3) => eprintln!(
                "promtool check metrics on the {what} scrape warns:\n{}",
                output_text(&out)
            ),
            _ => failures.push(format!(
                "promtool check metrics rejects the {what} scrape ({}):\n{}",
                out.status,
                output_text(&out)
            )),
        }
    }

    let mut exposition = Exposition::default();
    for (_, text) in &scrapes {
        exposition.add(text);
    }
    let mut ignored = Vec::new();
    let mut exprs = dashboard_exprs(&dashboard(), &mut ignored);
    exprs.extend(alert_exprs());
    let mut missing: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (place, expr) in &exprs {
        for name in metric_names(expr) {
            if PROMETHEUS_OWN.contains(&name.as_str()) || exposition.exports(&name) {
                continue;
            }
            missing.entry(name).or_default().push(place.clone());
        }
    }
    if !missing.is_empty() {
        failures.push(format!(
            "{} metric name(s) of {DASHBOARD} and {ALERTS} are in no scrape of the real \
             control-plane and tunnel-gateway (a typo, or a series not exported until \
             something happens: export it from the start):\n{}",
            missing.len(),
            missing
                .iter()
                .map(|(name, places)| {
                    let more = places.len().saturating_sub(3);
                    let more = if more > 0 {
                        format!("; {more} more")
                    } else {
                        String::new()
                    };
                    format!(
                        "  {name}  (in {}{more})",
                        places[..places.len().min(3)].join("; ")
                    )
                })
                .collect::<Vec<_>>()
                .join("\n")
        ));
    }
    drop(gw);
    drop(cp);
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
