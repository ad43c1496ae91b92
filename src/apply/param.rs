//! A pgoutput value passed to the target as it came: text (or binary) bytes, parsed by the
//! column type's own input function, so every type round-trips without a Rust mapping.

use bytes::BytesMut;
use tokio_postgres::types::{to_sql_checked, Format, IsNull, ToSql, Type};

use crate::pgoutput::Value;

#[derive(Debug)]
pub struct Param<'a>(pub &'a Value);

impl ToSql for Param<'_> {
    fn to_sql(
        &self,
        _ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self.0 {
            Value::Null => Ok(IsNull::Yes),
            Value::Text(b) | Value::Binary(b) => {
                out.extend_from_slice(b);
                Ok(IsNull::No)
            }
            // The statement builder leaves these columns out; reaching here is a bug upstream of us.
            Value::UnchangedToast => Err("unchanged TOAST value cannot be written".into()),
        }
    }

    fn accepts(_ty: &Type) -> bool {
        true
    }

    fn encode_format(&self, _ty: &Type) -> Format {
        match self.0 {
            Value::Binary(_) => Format::Binary,
            _ => Format::Text,
        }
    }

    to_sql_checked!();
}
