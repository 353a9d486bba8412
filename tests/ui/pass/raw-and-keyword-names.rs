// Raw field names, keyword-like variants and a raw enum name expand to valid code: the handler
// method of `Type` is `r#type`, of `Return` is `r#return`, and rules on `r#type` work.
use outbox_runtime::{HandlerError, OutboxEvent, OutboxService, Validate};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, JsonSchema, OutboxEvent)]
#[outbox(event_type = "doc.type.changed", version = 1, service = "docs", key = r#type)]
pub struct TypeChanged {
    #[outbox(validate(non_empty))]
    pub r#type: String,
}

#[derive(Serialize, Deserialize, JsonSchema, OutboxEvent)]
#[outbox(event_type = "doc.returned", version = 1, service = "docs")]
pub struct Returned {
    pub id: u64,
}

#[derive(OutboxService)]
#[outbox(service = "docs")]
pub enum r#DocEvents {
    Type(TypeChanged),
    Return(Returned),
}

struct H;

impl<C: ?Sized + Send> DocEventsHandler<C> for H {
    async fn r#type(&self, _: &mut C, _: TypeChanged) -> Result<(), HandlerError> {
        Ok(())
    }
    async fn r#return(&self, _: &mut C, _: Returned) -> Result<(), HandlerError> {
        Ok(())
    }
}

fn main() {
    let e = TypeChanged { r#type: " ".into() };
    assert_eq!(e.validate().unwrap_err().to_string(), "type: must not be empty");
    assert_eq!(DocEvents::EVENTS[0].handler, "type");
    fn needs<S: outbox_runtime::Dispatch<H, ()>>() {}
    needs::<DocEvents>();
}
