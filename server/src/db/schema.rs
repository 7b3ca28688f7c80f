// Diesel table definitions, kept in step with migrations/ (regenerate with `diesel print-schema`).

diesel::table! {
    account_identities (source, external_key) {
        source -> Text,
        external_key -> Text,
        account_id -> Int8,
        matched_by -> Text,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
    }
}

diesel::table! {
    accounts (id) {
        id -> Int8,
        key -> Text,
        name -> Text,
        domain -> Nullable<Text>,
        owner -> Nullable<Text>,
        plan -> Nullable<Text>,
        seats -> Nullable<Int4>,
        mrr -> Nullable<Numeric>,
        renewal_date -> Nullable<Date>,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
    }
}

diesel::table! {
    alert_rules (key) {
        key -> Text,
        enabled -> Bool,
        severity -> Text,
        config -> Jsonb,
        updated_at -> Timestamptz,
    }
}

diesel::table! {
    alerts (id) {
        id -> Int8,
        account_id -> Int8,
        rule -> Text,
        severity -> Text,
        status -> Text,
        message -> Text,
        drivers -> Jsonb,
        assignee -> Nullable<Text>,
        due_at -> Nullable<Timestamptz>,
        snoozed_until -> Nullable<Timestamptz>,
        feedback -> Nullable<Text>,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
        acknowledged_at -> Nullable<Timestamptz>,
        resolved_at -> Nullable<Timestamptz>,
    }
}

diesel::table! {
    api_tokens (id) {
        id -> Int8,
        name -> Text,
        role -> Text,
        token_hash -> Text,
        created_at -> Timestamptz,
        last_used_at -> Nullable<Timestamptz>,
        revoked_at -> Nullable<Timestamptz>,
    }
}

diesel::table! {
    churn_outcomes (account_id, churned_at) {
        account_id -> Int8,
        churned_at -> Timestamptz,
        source -> Text,
    }
}

diesel::table! {
    connector_run_rejections (run_id, seq) {
        run_id -> Int8,
        seq -> Int4,
        file -> Nullable<Text>,
        line -> Nullable<Int8>,
        reason -> Text,
    }
}

diesel::table! {
    connector_runs (id) {
        id -> Int8,
        connector_id -> Int8,
        status -> Text,
        trigger -> Text,
        started_at -> Timestamptz,
        finished_at -> Nullable<Timestamptz>,
        heartbeat_at -> Timestamptz,
        records_ingested -> Int8,
        records_rejected -> Int8,
        record_kinds -> Array<Text>,
        error -> Nullable<Text>,
    }
}

diesel::table! {
    connectors (id) {
        id -> Int8,
        name -> Text,
        plugin -> Text,
        schedule -> Text,
        settings -> Jsonb,
        enabled -> Bool,
        timeout_secs -> Int4,
        max_age_hours -> Int4,
        from_config -> Bool,
        cursor -> Nullable<Text>,
        next_run_at -> Nullable<Timestamptz>,
        failures -> Int4,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
    }
}

diesel::table! {
    health_current (account_id) {
        account_id -> Int8,
        computed_at -> Timestamptz,
        score -> Float8,
        tier -> Text,
        stale -> Bool,
        model_version -> Int4,
        previous_score -> Nullable<Float8>,
        score_change -> Float8,
        signals -> Nullable<Json>,
        signals_digest -> Nullable<Int8>,
        history_at -> Nullable<Timestamptz>,
    }
}

diesel::table! {
    health_scores (account_id, computed_at) {
        account_id -> Int8,
        computed_at -> Timestamptz,
        score -> Float8,
        tier -> Text,
        stale -> Bool,
        model_version -> Int4,
        signals -> Json,
    }
}

diesel::table! {
    invoices (account_id, source, invoice_id) {
        account_id -> Int8,
        source -> Text,
        invoice_id -> Text,
        amount -> Numeric,
        currency -> Text,
        due_date -> Date,
        paid_at -> Nullable<Timestamptz>,
        status -> Text,
        updated_at -> Timestamptz,
    }
}

diesel::table! {
    score_changes (id) {
        id -> Int8,
        account_id -> Int8,
        previous_score -> Nullable<Float8>,
        score -> Float8,
        previous_tier -> Nullable<Text>,
        tier -> Text,
        drivers -> Nullable<Json>,
        changed_at -> Timestamptz,
    }
}

diesel::table! {
    scoring_models (id) {
        id -> Int8,
        version -> Int4,
        name -> Text,
        segment -> Nullable<Jsonb>,
        priority -> Int4,
        config -> Jsonb,
        active -> Bool,
        notes -> Nullable<Text>,
        created_by -> Nullable<Text>,
        created_at -> Timestamptz,
    }
}

diesel::table! {
    source_freshness (connector_id, kind) {
        connector_id -> Int8,
        kind -> Text,
        last_success_at -> Timestamptz,
    }
}

diesel::table! {
    subscriptions (account_id, source, subscription_id) {
        account_id -> Int8,
        source -> Text,
        subscription_id -> Text,
        status -> Text,
        mrr -> Nullable<Numeric>,
        current_period_end -> Nullable<Timestamptz>,
        cancel_at_period_end -> Bool,
        updated_at -> Timestamptz,
    }
}

diesel::table! {
    support_tickets (account_id, source, ticket_id) {
        account_id -> Int8,
        source -> Text,
        ticket_id -> Text,
        subject -> Nullable<Text>,
        priority -> Text,
        status -> Text,
        opened_at -> Timestamptz,
        closed_at -> Nullable<Timestamptz>,
        csat -> Nullable<Int2>,
        updated_at -> Timestamptz,
    }
}

diesel::table! {
    usage_daily (account_id, day, user_id, event, feature) {
        account_id -> Int8,
        day -> Date,
        user_id -> Text,
        event -> Text,
        feature -> Text,
        events -> Int8,
    }
}

diesel::table! {
    usage_events (account_id, source, event_uid) {
        account_id -> Int8,
        source -> Text,
        event_uid -> Text,
        user_id -> Nullable<Text>,
        event -> Text,
        feature -> Nullable<Text>,
        occurred_at -> Timestamptz,
        count -> Int4,
    }
}

diesel::table! {
    webhook_deliveries (id) {
        id -> Int8,
        webhook_id -> Int8,
        event_type -> Text,
        event_id -> Int8,
        payload -> Jsonb,
        status -> Text,
        attempts -> Int4,
        next_attempt_at -> Timestamptz,
        last_error -> Nullable<Text>,
        response_status -> Nullable<Int4>,
        created_at -> Timestamptz,
        delivered_at -> Nullable<Timestamptz>,
    }
}

diesel::table! {
    webhooks (id) {
        id -> Int8,
        name -> Text,
        url -> Text,
        secret -> Text,
        events -> Array<Text>,
        filter -> Jsonb,
        format -> Text,
        enabled -> Bool,
        created_at -> Timestamptz,
    }
}

diesel::allow_tables_to_appear_in_same_query!(
    account_identities,
    accounts,
    alert_rules,
    alerts,
    api_tokens,
    churn_outcomes,
    connector_run_rejections,
    connector_runs,
    connectors,
    health_current,
    health_scores,
    invoices,
    score_changes,
    scoring_models,
    source_freshness,
    subscriptions,
    support_tickets,
    usage_daily,
    usage_events,
    webhook_deliveries,
    webhooks,
);
