//! A small builder for statements whose shape depends on the request (filters, cursors): SQL text
//! with `$n` placeholders plus the values bound to them, in order.

use chrono::NaiveDate;
use diesel::pg::Pg;
use diesel::query_builder::{BoxedSqlQuery, SqlQuery};
use diesel::sql_types::{Array, BigInt, Date, Double, Text};

/// A value bound to a placeholder.
#[derive(Debug, Clone)]
pub(crate) enum Bind {
    BigInt(i64),
    Double(f64),
    Text(String),
    TextArray(Vec<String>),
    Date(NaiveDate),
}

#[derive(Debug, Default)]
pub(crate) struct Params {
    binds: Vec<Bind>,
}

impl Params {
    /// Registers a value and returns its placeholder (`$n`), to be written into the SQL text.
    pub fn add(&mut self, value: Bind) -> String {
        self.binds.push(value);
        format!("${}", self.binds.len())
    }

    /// The statement `sql` with every registered value bound.
    pub fn query(self, sql: String) -> BoxedSqlQuery<'static, Pg, SqlQuery> {
        let mut q = diesel::sql_query(sql).into_boxed::<Pg>();
        for b in self.binds {
            q = match b {
                Bind::BigInt(v) => q.bind::<BigInt, _>(v),
                Bind::Double(v) => q.bind::<Double, _>(v),
                Bind::Text(v) => q.bind::<Text, _>(v),
                Bind::TextArray(v) => q.bind::<Array<Text>, _>(v),
                Bind::Date(v) => q.bind::<Date, _>(v),
            };
        }
        q
    }
}
