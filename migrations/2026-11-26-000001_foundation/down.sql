DROP TABLE IF EXISTS api_tokens, webhook_deliveries, webhooks, alerts, alert_rules, source_freshness,
    connector_run_rejections, connector_runs, connectors, score_changes, health_current, health_scores,
    scoring_models, churn_outcomes, invoices, subscriptions, support_tickets, usage_daily, usage_events,
    account_identities, accounts CASCADE;
