//! healthd: customer health scores from product usage, support tickets and billing data.
//!
//! The tree follows the domain: `connectors/` brings data in through `plugins/`, `scoring/` turns it
//! into explained scores, `alerts/`, `feed/` and `webhooks/` push changes out, `graphql/` and `http/`
//! serve it, `db/` stores it.

pub mod accounts;
pub mod alerts;
pub mod app;
pub mod auth;
pub mod bench;
pub mod cli;
pub mod config;
pub mod connectors;
pub mod db;
pub mod demo;
pub mod feed;
pub mod graphql;
pub mod http;
pub mod jobs;
pub mod plugins;
pub mod scoring;
pub mod telemetry;
pub mod testing;
pub mod webhooks;
