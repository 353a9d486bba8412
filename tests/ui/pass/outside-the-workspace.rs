// A complete contract as a service team writes it: nested validation, a struct-level check,
// key by method, route overrides, a renamed handler trait and method, and a handler that uses
// its context.
use outbox_runtime::{HandlerError, OutboxEvent, OutboxService, Validate, Violations};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, JsonSchema, Validate)]
pub struct Line {
    #[outbox(validate(non_empty))]
    pub sku: String,
    #[outbox(validate(range(min = 1, max = 1000)))]
    pub qty: u32,
}

#[derive(Serialize, Deserialize, JsonSchema, OutboxEvent)]
#[serde(rename_all = "camelCase")]
#[outbox(event_type = "order.placed", version = 3, service = "orders", key = shard(), validate = check_total)]
pub struct OrderPlaced {
    #[outbox(validate(regex = "ord_[0-9a-z]{8}"))]
    pub order_id: String,
    #[outbox(validate(non_empty, nested))]
    pub lines: Vec<Line>,
    pub total_cents: i64,
}

impl OrderPlaced {
    fn shard(&self) -> String {
        self.order_id.chars().rev().take(2).collect()
    }
}

fn check_total(o: &OrderPlaced) -> Result<(), Violations> {
    let mut v = Violations::new();
    if o.total_cents < 0 {
        v.push("totalCents", "negative", "must not be negative");
    }
    v.into_result()
}

#[derive(OutboxService)]
#[outbox(service = "orders", table = "shop_orders_outbox", topic = "shop.orders", group = "shop-orders", handler = OrderHandler)]
pub enum OrderEvents {
    #[outbox(handler = on_placed)]
    Placed(OrderPlaced),
}

struct Counter;

impl OrderHandler<Vec<String>> for Counter {
    async fn on_placed(&self, seen: &mut Vec<String>, event: OrderPlaced) -> Result<(), HandlerError> {
        seen.push(event.order_id);
        Ok(())
    }
}

fn main() {
    let bad = br#"{"orderId":"ord_1","lines":[{"sku":" ","qty":0}],"totalCents":-5}"#;
    let Err(err) = OrderEvents::decode("order.placed", 3, bad) else {
        panic!("an invalid order was accepted");
    };
    assert_eq!(
        err.to_string(),
        "invalid `order.placed` v3 payload: orderId: must match `ord_[0-9a-z]{8}`; lines[0].sku: must not be empty; lines[0].qty: value must be between 1 and 1000, got 0; totalCents: must not be negative"
    );
    let good = br#"{"orderId":"ord_abcdefgh","lines":[{"sku":"x","qty":1}],"totalCents":5}"#;
    let Ok(event) = OrderEvents::decode("order.placed", 3, good) else {
        panic!("a valid order was rejected");
    };
    assert_eq!(event.message_key().as_deref(), Some("hg"));
    assert_eq!(OrderEvents::ROUTE.table, Some("shop_orders_outbox"));
    assert_eq!(OrderPlaced::VERSION, 3);

    let mut seen = Vec::new();
    {
        let fut = outbox_runtime::Dispatch::dispatch(event, &Counter, &mut seen);
        let mut fut = std::pin::pin!(fut);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        assert!(fut.as_mut().poll(&mut cx).is_ready());
    }
    assert_eq!(seen, ["ord_abcdefgh"]);
}
