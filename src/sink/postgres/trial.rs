//! Trials of one statement for `ingestd test`: the production path in a
//! transaction that is rolled back.

use super::*;

/// What a trial of one statement did (see [`PgSink::trial`]).
#[derive(Debug)]
pub enum Trial {
    /// The row the statement returned (`None`: it returned none, e.g.
    /// `ON CONFLICT DO NOTHING`).
    Row(Option<Json>),
    /// The statement's kind cannot show its row (it has a WITH of its own).
    Unavailable,
    /// The row's own fault: the event would be rejected.
    Rejected(Rejection),
}

impl PgSink {
    /// Runs one row statement inside a transaction that is rolled back and
    /// returns the row it wrote (for `ingestd test`).
    pub async fn trial(&self, row: &Rendered) -> Result<Trial, WriteError> {
        let plan = self.plan(row).await?;
        let values = match plan.encode(&row.params) {
            Ok(v) => v,
            Err(e) => {
                return Ok(Trial::Rejected(Rejection {
                    sqlstate: None,
                    error: e.to_string(),
                }))
            }
        };
        if crate::sink::postgres::sql::first_word(&plan.sql).as_deref() == Some("with") {
            return Ok(Trial::Unavailable);
        }
        let returning = if plan.returns_rows {
            ""
        } else {
            " RETURNING *"
        };
        let sql = format!(
            "WITH ingestd_trial AS ({}{returning}) SELECT row_to_json(ingestd_trial)::text FROM ingestd_trial",
            plan.row_sql
        );
        let mut conn = self.acquire().await?;
        let mut tx = conn.begin().await.map_err(WriteError::from_sqlx)?;
        let mut q = sqlx::query_scalar::<_, String>(&sql);
        for v in &values {
            q = q.bind(v.as_deref());
        }
        let result = q.fetch_optional(&mut *tx).await;
        tx.rollback().await.map_err(WriteError::from_sqlx)?;
        match result {
            Ok(text) => Ok(Trial::Row(text.and_then(|t| serde_json::from_str(&t).ok()))),
            Err(e) if sqlstate::fault(&e) == Fault::Event => Ok(Trial::Rejected(Rejection {
                sqlstate: db_code(&e),
                error: sqlstate::describe(&e),
            })),
            Err(e) => Err(WriteError::from_sqlx(e)),
        }
    }
}
