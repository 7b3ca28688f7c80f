//! Alert rules: built-in defaults, overridden by the `[alerts]` config section, overridden by admin
//! changes stored in `alert_rules`.
//!
//! ```toml
//! [alerts]
//! cooldown_hours = 24          # default for every rule
//! healthy_min = 70             # tier boundaries used for hysteresis (as in the scoring model)
//! at_risk_min = 40
//! evaluate_every_minutes = 15  # time-based rules (no login, ticket age, renewal)
//! [alerts.rules.score_drop]
//! points = 15
//! severity = "critical"
//! ```

use std::collections::BTreeMap;
use std::sync::RwLock;

use diesel::sql_types::{Bool, Jsonb, Text};
use diesel::QueryableByName;
use diesel_async::RunQueryDsl;
use serde_json::{json, Map, Value};

use super::AlertError;
use crate::db::DbPool;

/// A tunable number of a rule.
pub struct ParamDef {
    pub name: &'static str,
    pub default: f64,
    /// Whole numbers only (hours, days).
    pub integer: bool,
    pub description: &'static str,
}

/// A built-in rule.
pub struct RuleDef {
    pub key: &'static str,
    pub description: &'static str,
    pub severity: &'static str,
    pub params: &'static [ParamDef],
}

const fn p(name: &'static str, default: f64, integer: bool, description: &'static str) -> ParamDef {
    ParamDef {
        name,
        default,
        integer,
        description,
    }
}

/// Parameters every rule has.
pub const COMMON_PARAMS: &[ParamDef] = &[
    p(
        "cooldown_hours",
        24.0,
        true,
        "after an alert is resolved, no new one for the same account and rule for this long",
    ),
    p(
        "due_hours",
        72.0,
        true,
        "a new alert is due this many hours after it is raised (0: no due date)",
    ),
];

pub static RULES: &[RuleDef] = &[
    RuleDef {
        key: "score_drop",
        description: "The score dropped by `points` or more within `window_days`; resolves when it recovers to within `points - clear_margin` of the earlier peak.",
        severity: "warning",
        params: &[
            p("points", 10.0, false, "points lost that raise the alert"),
            p("window_days", 7.0, true, "how far back the earlier peak is looked for"),
            p("clear_margin", 3.0, false, "the recovery needed beyond the threshold before it resolves"),
        ],
    },
    RuleDef {
        key: "tier_worsened",
        description: "The health tier got worse than it was within `window_days`; resolves when the tier is back and the score is `clear_margin` points inside it.",
        severity: "warning",
        params: &[
            p("window_days", 7.0, true, "how far back the better tier is looked for"),
            p("clear_margin", 3.0, false, "points above the tier boundary needed before it resolves"),
        ],
    },
    RuleDef {
        key: "no_login",
        description: "No user logged in for `days` days (accounts with usage data only); resolves after a login.",
        severity: "warning",
        params: &[
            p("days", 14.0, true, "days without a login that raise the alert"),
            p("clear_margin_days", 2.0, true, "the alert resolves once the last login is this many days inside the threshold"),
        ],
    },
    RuleDef {
        key: "invoice_past_due",
        description: "An open invoice is past its due date by more than `grace_days`; resolves when none is.",
        severity: "critical",
        params: &[p("grace_days", 0.0, true, "days after the due date before an invoice counts as past due")],
    },
    RuleDef {
        key: "urgent_ticket_open",
        description: "An urgent support ticket has been open longer than `hours`; resolves when no urgent ticket is open.",
        severity: "critical",
        params: &[p("hours", 48.0, true, "hours an urgent ticket may stay open")],
    },
    RuleDef {
        key: "renewal_at_risk",
        description: "The renewal date is within `within_days` while the account is AT_RISK or CRITICAL; resolves when it is HEALTHY by `clear_margin` points or the renewal is no longer near.",
        severity: "critical",
        params: &[
            p("within_days", 60.0, true, "days before renewal that count as near"),
            p("clear_margin", 3.0, false, "points above the HEALTHY boundary needed before it resolves"),
            p("clear_margin_days", 7.0, true, "days beyond `within_days` before a moved renewal resolves it"),
        ],
    },
];

/// Global parameters (not per rule).
const GLOBAL_PARAMS: &[ParamDef] = &[
    p(
        "healthy_min",
        70.0,
        false,
        "lowest HEALTHY score (the scoring model's default boundary)",
    ),
    p("at_risk_min", 40.0, false, "lowest AT_RISK score"),
    p(
        "evaluate_every_minutes",
        15.0,
        true,
        "how often time-based rules are evaluated for every account",
    ),
];

pub const SEVERITIES: &[&str] = &["info", "warning", "critical"];

/// Where a rule's effective settings come from (the highest layer that set anything).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleSource {
    Default,
    Config,
    Database,
}

/// One rule's effective settings.
#[derive(Debug, Clone)]
pub struct AlertRuleSettings {
    pub key: String,
    pub description: String,
    pub enabled: bool,
    pub severity: String,
    pub params: BTreeMap<String, f64>,
    pub source: RuleSource,
}

/// All rules' effective settings plus the global parameters.
#[derive(Debug, Clone)]
pub struct RuleSet {
    pub rules: Vec<AlertRuleSettings>,
    pub globals: BTreeMap<String, f64>,
}

static FILE_CONFIG: RwLock<Option<Value>> = RwLock::new(None);

/// Installs the process's `[alerts]` config section (validated) as the layer between defaults and
/// the database for callers that have no config at hand ([`super::evaluate`] after scoring).
/// Called at start by the background jobs; calling it again replaces it.
pub fn install_file_config(section: &Value) -> Result<(), AlertError> {
    // Validate now so a bad file fails at start, not at the first evaluation.
    let mut probe = RuleSet::defaults();
    probe.apply_file_layer(section)?;
    *FILE_CONFIG.write().unwrap_or_else(|e| e.into_inner()) = Some(section.clone());
    Ok(())
}

/// The section installed with [`install_file_config`], if any.
pub fn installed_file_config() -> Option<Value> {
    FILE_CONFIG
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
}

fn rule_def(key: &str) -> Result<&'static RuleDef, AlertError> {
    RULES
        .iter()
        .find(|r| r.key == key)
        .ok_or_else(|| AlertError::UnknownRule(key.to_string()))
}

fn number(name: &str, value: &Value, integer: bool) -> Result<f64, String> {
    let n = value
        .as_f64()
        .ok_or_else(|| format!("`{name}` must be a number, got {value}"))?;
    if !n.is_finite() || n < 0.0 {
        return Err(format!("`{name}` must be zero or more, got {n}"));
    }
    if integer && n.fract() != 0.0 {
        return Err(format!("`{name}` must be a whole number, got {n}"));
    }
    Ok(n)
}

impl AlertRuleSettings {
    fn default_for(def: &RuleDef) -> Self {
        let mut params: BTreeMap<String, f64> = COMMON_PARAMS
            .iter()
            .chain(def.params)
            .map(|p| (p.name.to_string(), p.default))
            .collect();
        if def.severity == "critical" {
            params.insert("due_hours".into(), 24.0);
        }
        AlertRuleSettings {
            key: def.key.to_string(),
            description: def.description.to_string(),
            enabled: true,
            severity: def.severity.to_string(),
            params,
            source: RuleSource::Default,
        }
    }

    /// Applies one layer (`enabled`, `severity`, parameters); unknown keys are errors.
    fn apply(&mut self, layer: &Map<String, Value>, source: RuleSource) -> Result<(), AlertError> {
        let def = rule_def(&self.key)?;
        let bad = |m: String| AlertError::InvalidInput(format!("alert rule `{}`: {m}", self.key));
        for (name, value) in layer {
            match name.as_str() {
                "enabled" => {
                    self.enabled = value.as_bool().ok_or_else(|| {
                        bad(format!("`enabled` must be true or false, got {value}"))
                    })?
                }
                "severity" => {
                    let s = value
                        .as_str()
                        .map(str::to_ascii_lowercase)
                        .unwrap_or_default();
                    if !SEVERITIES.contains(&s.as_str()) {
                        return Err(bad(format!(
                            "`severity` must be info, warning or critical, got {value}"
                        )));
                    }
                    self.severity = s;
                }
                other => {
                    let param = COMMON_PARAMS
                        .iter()
                        .chain(def.params)
                        .find(|p| p.name == other)
                        .ok_or_else(|| {
                            let known: Vec<&str> = COMMON_PARAMS
                                .iter()
                                .chain(def.params)
                                .map(|p| p.name)
                                .collect();
                            bad(format!(
                                "unknown setting `{other}` (known: enabled, severity, {})",
                                known.join(", ")
                            ))
                        })?;
                    let n = number(other, value, param.integer).map_err(bad)?;
                    self.params.insert(other.to_string(), n);
                }
            }
        }
        if !layer.is_empty() {
            self.source = source;
        }
        Ok(())
    }

    pub fn param(&self, name: &str) -> f64 {
        self.params.get(name).copied().unwrap_or(0.0)
    }
}

impl RuleSet {
    /// The built-in defaults.
    pub fn defaults() -> Self {
        RuleSet {
            rules: RULES.iter().map(AlertRuleSettings::default_for).collect(),
            globals: GLOBAL_PARAMS
                .iter()
                .map(|p| (p.name.to_string(), p.default))
                .collect(),
        }
    }

    pub fn get(&self, key: &str) -> Option<&AlertRuleSettings> {
        self.rules.iter().find(|r| r.key == key)
    }

    pub fn global(&self, name: &str) -> f64 {
        self.globals.get(name).copied().unwrap_or(0.0)
    }

    fn apply_file_layer(&mut self, section: &Value) -> Result<(), AlertError> {
        let Some(section) = section.as_object() else {
            return Ok(());
        };
        let bad = |m: String| AlertError::InvalidInput(format!("[alerts]: {m}"));
        for (name, value) in section {
            match name.as_str() {
                "rules" => {}
                // Read by the webhook delivery worker.
                "delivery" => {}
                "cooldown_hours" => {
                    let n = number(name, value, true).map_err(bad)?;
                    for rule in &mut self.rules {
                        rule.params.insert("cooldown_hours".into(), n);
                        rule.source = RuleSource::Config;
                    }
                }
                other => {
                    let param = GLOBAL_PARAMS.iter().find(|p| p.name == other).ok_or_else(|| {
                        bad(format!(
                            "unknown setting `{other}` (known: rules, delivery, cooldown_hours, healthy_min, at_risk_min, evaluate_every_minutes)"
                        ))
                    })?;
                    let n = number(other, value, param.integer).map_err(bad)?;
                    self.globals.insert(other.to_string(), n);
                }
            }
        }
        if let Some(rules) = section.get("rules") {
            let rules = rules
                .as_object()
                .ok_or_else(|| bad("`rules` must be a table of rule keys".into()))?;
            for (key, layer) in rules {
                let layer = layer
                    .as_object()
                    .ok_or_else(|| bad(format!("`rules.{key}` must be a table")))?;
                let rule = self
                    .rules
                    .iter_mut()
                    .find(|r| &r.key == key)
                    .ok_or_else(|| AlertError::UnknownRule(key.clone()))?;
                rule.apply(layer, RuleSource::Config)?;
            }
        }
        Ok(())
    }

    /// The settings as the JSON document the evaluation SQL reads (`$1`).
    pub fn to_sql_json(&self) -> Value {
        let rules: Map<String, Value> = self
            .rules
            .iter()
            .map(|r| {
                let mut obj = Map::new();
                obj.insert("enabled".into(), json!(r.enabled));
                obj.insert("severity".into(), json!(r.severity));
                for (name, value) in &r.params {
                    // Whole numbers as integers: the SQL casts them with ::int.
                    let v = if value.fract() == 0.0 {
                        json!(*value as i64)
                    } else {
                        json!(value)
                    };
                    obj.insert(name.clone(), v);
                }
                (r.key.clone(), Value::Object(obj))
            })
            .collect();
        let mut doc = Map::new();
        doc.insert("rules".into(), Value::Object(rules));
        for (name, value) in &self.globals {
            doc.insert(name.clone(), json!(value));
        }
        Value::Object(doc)
    }
}

#[derive(QueryableByName)]
struct StoredRule {
    #[diesel(sql_type = Text)]
    key: String,
    #[diesel(sql_type = Bool)]
    enabled: bool,
    #[diesel(sql_type = Text)]
    severity: String,
    #[diesel(sql_type = Jsonb)]
    config: Value,
}

/// The effective rules: defaults, then the `[alerts]` section `file`, then the `alert_rules` table.
pub async fn load(pool: &DbPool, file: Option<&Value>) -> Result<RuleSet, AlertError> {
    let mut set = RuleSet::defaults();
    if let Some(section) = file {
        set.apply_file_layer(section)?;
    }
    let mut conn = pool.get().await.map_err(crate::db::DbError::from)?;
    let stored: Vec<StoredRule> =
        diesel::sql_query("SELECT key, enabled, severity, config FROM alert_rules ORDER BY key")
            .load(&mut conn)
            .await?;
    for row in stored {
        let Some(rule) = set.rules.iter_mut().find(|r| r.key == row.key) else {
            tracing::warn!(rule = %row.key, "ignoring unknown alert rule in the alert_rules table");
            continue;
        };
        let mut layer = row.config.as_object().cloned().unwrap_or_default();
        layer.insert("enabled".into(), json!(row.enabled));
        layer.insert("severity".into(), json!(row.severity));
        if let Err(e) = rule.apply(&layer, RuleSource::Database) {
            tracing::warn!(rule = %row.key, error = %e, "ignoring invalid stored alert rule settings");
        }
    }
    Ok(set)
}

/// An admin change to one rule, stored in `alert_rules` (it wins over the config file).
#[derive(Debug, Default, Clone)]
pub struct RuleUpdate {
    pub enabled: Option<bool>,
    pub severity: Option<String>,
    /// Parameter values by name (`points`, `cooldown_hours`...).
    pub params: Map<String, Value>,
}

pub async fn update_rule(
    pool: &DbPool,
    file: Option<&Value>,
    key: &str,
    update: &RuleUpdate,
) -> Result<AlertRuleSettings, AlertError> {
    rule_def(key)?;
    let current = load(pool, file).await?;
    let mut rule = current
        .get(key)
        .cloned()
        .ok_or_else(|| AlertError::UnknownRule(key.into()))?;
    // Validate the whole change against the effective settings before storing anything.
    let mut layer = update.params.clone();
    if let Some(enabled) = update.enabled {
        layer.insert("enabled".into(), json!(enabled));
    }
    if let Some(severity) = &update.severity {
        layer.insert("severity".into(), json!(severity.to_ascii_lowercase()));
    }
    rule.apply(&layer, RuleSource::Database)?;
    let mut conn = pool.get().await.map_err(crate::db::DbError::from)?;
    diesel::sql_query(
        "INSERT INTO alert_rules (key, enabled, severity, config) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (key) DO UPDATE SET enabled = EXCLUDED.enabled, severity = EXCLUDED.severity, \
         config = alert_rules.config || EXCLUDED.config, updated_at = now()",
    )
    .bind::<Text, _>(key)
    .bind::<Bool, _>(rule.enabled)
    .bind::<Text, _>(&rule.severity)
    .bind::<Jsonb, _>(Value::Object(update.params.clone()))
    .execute(&mut conn)
    .await?;
    Ok(rule)
}
