//! Service `token-store`: credits and rewards. Forum and llm write into its outbox.

use chrono::{DateTime, Utc};
use outbox_contract::{OutboxEvent, OutboxService, Violations};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Reward a post's author for a like.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, OutboxEvent)]
#[outbox(
    event_type = "forum.post.liked",
    version = 1,
    service = "token-store",
    key = event_id,
    aggregate = post_key()
)]
pub struct ForumPostLiked {
    /// Stable idempotency id: `forum.post.liked:{post_id}:{actor_user_id}`.
    #[outbox(validate(non_empty, length(max = 191)))]
    pub event_id: String,
    /// The post.
    #[outbox(validate(range(min = 1)))]
    pub post_id: u64,
    /// The post's author.
    #[outbox(validate(range(min = 1)))]
    pub author_user_id: u64,
    /// Who liked it.
    #[outbox(validate(range(min = 1)))]
    pub actor_user_id: u64,
    /// Who gets the reward (the author).
    #[outbox(validate(range(min = 1)))]
    pub reward_receiver_user_id: u64,
    /// When.
    pub occurred_at: DateTime<Utc>,
}

impl ForumPostLiked {
    /// `post:{post_id}`.
    pub fn post_key(&self) -> String {
        format!("post:{}", self.post_id)
    }
}

/// Reward a post's author for an import of their post.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, OutboxEvent)]
#[outbox(
    event_type = "forum.post.imported",
    version = 1,
    service = "token-store",
    key = event_id,
    aggregate = post_key()
)]
pub struct ForumPostImported {
    /// Stable idempotency id: `forum.post.imported:{post_id}:{actor_user_id}`.
    #[outbox(validate(non_empty, length(max = 191)))]
    pub event_id: String,
    /// The post.
    #[outbox(validate(range(min = 1)))]
    pub post_id: u64,
    /// The import record.
    #[outbox(validate(range(min = 1)))]
    pub import_id: u64,
    /// The post's author.
    #[outbox(validate(range(min = 1)))]
    pub author_user_id: u64,
    /// Who imported it.
    #[outbox(validate(range(min = 1)))]
    pub actor_user_id: u64,
    /// Who gets the reward (the author).
    #[outbox(validate(range(min = 1)))]
    pub reward_receiver_user_id: u64,
    /// When.
    pub occurred_at: DateTime<Utc>,
}

impl ForumPostImported {
    /// `post:{post_id}`.
    pub fn post_key(&self) -> String {
        format!("post:{}", self.post_id)
    }
}

/// Charge a user for one model call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, OutboxEvent)]
#[outbox(
    event_type = "credit.charge.requested",
    version = 1,
    service = "token-store",
    key = event_id,
    aggregate = user_key(),
    validate = Self::check_costs
)]
pub struct CreditChargeRequested {
    /// Final idempotency key of the charge.
    #[outbox(validate(non_empty, length(max = 191)))]
    pub event_id: String,
    /// The user charged.
    #[outbox(validate(range(min = 1)))]
    pub user_id: u64,
    /// The calling scene.
    #[outbox(validate(non_empty, length(max = 64)))]
    pub scene: String,
    /// The request.
    pub request_id: String,
    /// The chat, when the call came from one.
    #[serde(default)]
    pub conversation_id: String,
    /// The logical model alias.
    pub model_alias: String,
    /// The provider.
    #[outbox(validate(non_empty))]
    pub provider_name: String,
    /// The concrete model.
    #[outbox(validate(non_empty))]
    pub model_name: String,
    /// Prompt tokens.
    pub input_tokens: i64,
    /// Completion tokens.
    pub output_tokens: i64,
    /// Cached prompt tokens.
    pub cached_tokens: i64,
    /// Reasoning tokens.
    pub reasoning_tokens: i64,
    /// All tokens.
    pub total_tokens: i64,
    /// Cost in millionths of a yuan.
    pub rmb_cost_micros: i64,
    /// Credits to charge.
    pub credit_cost: i64,
    /// When the call completed.
    pub triggered_at: DateTime<Utc>,
    /// Record the usage without charging.
    #[serde(default)]
    pub skip_charge: bool,
}

impl CreditChargeRequested {
    /// `user:{user_id}`.
    pub fn user_key(&self) -> String {
        format!("user:{}", self.user_id)
    }

    /// A charge never pays the user: costs are not negative unless nothing is charged.
    fn check_costs(&self) -> Result<(), Violations> {
        let mut v = Violations::new();
        if !self.skip_charge {
            for (path, cost) in [
                ("credit_cost", self.credit_cost),
                ("rmb_cost_micros", self.rmb_cost_micros),
            ] {
                if cost < 0 {
                    v.push(
                        path,
                        "negative_cost",
                        format!("must not be negative unless `skip_charge` is set, got {cost}"),
                    );
                }
            }
        }
        v.into_result()
    }
}

/// The events service `token-store` consumes.
#[derive(Debug, Clone, PartialEq, OutboxService)]
#[outbox(service = "token-store")]
pub enum TokenStoreEvents {
    /// A like to reward.
    ForumPostLiked(ForumPostLiked),
    /// An import to reward.
    ForumPostImported(ForumPostImported),
    /// A model call to charge.
    CreditChargeRequested(CreditChargeRequested),
}
