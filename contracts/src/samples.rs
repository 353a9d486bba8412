//! One valid event of every contract, for examples, tests and benchmarks. `n` varies the ids
//! and keys, so that many samples spread over many keys.

use chrono::{DateTime, TimeZone, Utc};

use crate::active_scheduler::{ActiveScheduleTriggered, TargetType, TriggerSource, TriggerType};
use crate::agent::{
    AgentStateSnapshotPersist, AgentTimelinePersistRequested, ChatHistoryPersistRequested,
    ChatTokenUsageAdjustRequested, Role, TimelineKind,
};
use crate::memory::MemoryExtractRequested;
use crate::notification::{Card, CardAction, FeishuRequested, FeishuRequestedV2, Priority};
use crate::task::TaskUrgencyPromoteRequested;
use crate::token_store::{CreditChargeRequested, ForumPostImported, ForumPostLiked};
use crate::{
    ActiveSchedulerEvents, AgentEvents, MemoryEvents, NotificationEvents, TaskEvents,
    TokenStoreEvents,
};

fn at(n: u64) -> DateTime<Utc> {
    let base = Utc.with_ymd_and_hms(2026, 11, 23, 9, 0, 0).single();
    base.unwrap_or_default() + chrono::Duration::seconds(n as i64)
}

fn conversation(n: u64) -> String {
    format!("c0ffee00-0000-4000-8000-{:012x}", n % 1000)
}

/// A chat message to persist.
pub fn chat_history(n: u64) -> ChatHistoryPersistRequested {
    ChatHistoryPersistRequested {
        user_id: 1 + n % 97,
        conversation_id: conversation(n),
        role: Role::Assistant,
        message: format!("Here is the plan for today, part {n}."),
        reasoning_content: None,
        reasoning_duration_seconds: Some(3),
        retry_group_id: None,
        retry_index: None,
        tokens_consumed: 420,
    }
}

/// Token usage to adjust.
pub fn token_usage(n: u64) -> ChatTokenUsageAdjustRequested {
    ChatTokenUsageAdjustRequested {
        user_id: 1 + n % 97,
        conversation_id: conversation(n),
        tokens_delta: 128,
        reason: "stream finished".into(),
        triggered_at: at(n),
    }
}

/// An agent state snapshot.
pub fn snapshot(n: u64) -> AgentStateSnapshotPersist {
    AgentStateSnapshotPersist {
        conversation_id: conversation(n),
        user_id: 1 + n % 97,
        phase: "planning".into(),
        snapshot: serde_json::json!({ "step": n, "pending_tools": [] }),
    }
}

/// A timeline entry.
pub fn timeline(n: u64) -> AgentTimelinePersistRequested {
    AgentTimelinePersistRequested {
        user_id: 1 + n % 97,
        conversation_id: conversation(n),
        seq: 1 + n as i64,
        kind: TimelineKind::AssistantText,
        role: Some(Role::Assistant),
        content: Some("Done.".into()),
        payload: None,
        tokens_consumed: 12,
    }
}

/// A memory extraction request.
pub fn memory_extract(n: u64) -> MemoryExtractRequested {
    let user_id = 1 + n % 97;
    MemoryExtractRequested {
        user_id,
        conversation_id: conversation(n),
        assistant_id: None,
        source_message_id: Some(n + 1),
        source_role: Role::User,
        source_text: "I prefer meetings after 10am.".into(),
        occurred_at: at(n),
        idempotency_key: format!("memory_extract_{user_id}_{:016x}", n),
    }
}

/// A task urgency promotion.
pub fn urgency(n: u64) -> TaskUrgencyPromoteRequested {
    TaskUrgencyPromoteRequested {
        user_id: 1 + n % 97,
        task_ids: vec![10 + n, 11 + n],
        triggered_at: at(n),
    }
}

/// A schedule trigger.
pub fn triggered(n: u64) -> ActiveScheduleTriggered {
    ActiveScheduleTriggered {
        trigger_id: format!("trg-{n}"),
        user_id: 1 + n % 97,
        trigger_type: TriggerType::ImportantUrgentTask,
        source: TriggerSource::WorkerDueJob,
        target_type: TargetType::TaskItem,
        target_id: 100 + n,
        feedback_id: None,
        idempotency_key: None,
        mock_now: None,
        is_mock_time: false,
        requested_at: at(n),
        payload: None,
        trace_id: None,
    }
}

/// A plain-text Feishu message (version 1).
pub fn feishu(n: u64) -> FeishuRequested {
    let user_id = 1 + n % 97;
    FeishuRequested {
        notification_id: None,
        user_id,
        trigger_id: format!("trg-{n}"),
        preview_id: format!("pv-{n}"),
        trigger_type: "important_urgent_task".into(),
        target_type: "task_item".into(),
        target_id: 100 + n,
        dedupe_key: format!("{user_id}:important_urgent_task:{}", at(n).to_rfc3339()),
        target_url: format!("/assistant/preview/pv-{n}"),
        summary_text: Some("3 tasks are due today".into()),
        fallback_text: None,
        trace_id: None,
        requested_at: at(n),
    }
}

/// A Feishu card message (version 2).
pub fn feishu_v2(n: u64) -> FeishuRequestedV2 {
    let user_id = 1 + n % 97;
    FeishuRequestedV2 {
        user_id,
        trigger_id: format!("trg-{n}"),
        preview_id: format!("pv-{n}"),
        dedupe_key: format!("{user_id}:pv-{n}"),
        card: Card {
            title: "Today".into(),
            body: "**3** tasks are due".into(),
            actions: vec![CardAction {
                label: "Open".into(),
                url: format!("/assistant/preview/pv-{n}"),
            }],
        },
        priority: Priority::Normal,
        locale: "zh-CN".into(),
        requested_at: at(n),
    }
}

/// A forum like to reward.
pub fn liked(n: u64) -> ForumPostLiked {
    ForumPostLiked {
        event_id: format!("forum.post.liked:{}:{}", 500 + n, 7 + n % 13),
        post_id: 500 + n,
        author_user_id: 3,
        actor_user_id: 7 + n % 13,
        reward_receiver_user_id: 3,
        occurred_at: at(n),
    }
}

/// A forum import to reward.
pub fn imported(n: u64) -> ForumPostImported {
    ForumPostImported {
        event_id: format!("forum.post.imported:{}:{}", 500 + n, 7 + n % 13),
        post_id: 500 + n,
        import_id: 9000 + n,
        author_user_id: 3,
        actor_user_id: 7 + n % 13,
        reward_receiver_user_id: 3,
        occurred_at: at(n),
    }
}

/// A model call to charge.
pub fn charge(n: u64) -> CreditChargeRequested {
    CreditChargeRequested {
        event_id: format!("charge-{n}"),
        user_id: 1 + n % 97,
        scene: "chat".into(),
        request_id: format!("req-{n}"),
        conversation_id: conversation(n),
        model_alias: "smart".into(),
        provider_name: "deepseek".into(),
        model_name: "deepseek-v3".into(),
        input_tokens: 1200,
        output_tokens: 300,
        cached_tokens: 800,
        reasoning_tokens: 0,
        total_tokens: 1500,
        rmb_cost_micros: 2100,
        credit_cost: 3,
        triggered_at: at(n),
        skip_charge: false,
    }
}

/// One sample of every event of every service, as each service's enum.
pub fn all(n: u64) -> Samples {
    Samples {
        agent: vec![
            chat_history(n).into(),
            token_usage(n).into(),
            snapshot(n).into(),
            timeline(n).into(),
        ],
        memory: vec![memory_extract(n).into()],
        task: vec![urgency(n).into()],
        active_scheduler: vec![triggered(n).into()],
        notification: vec![feishu(n).into(), feishu_v2(n).into()],
        token_store: vec![liked(n).into(), imported(n).into(), charge(n).into()],
    }
}

/// Samples grouped by service.
#[derive(Debug, Clone)]
pub struct Samples {
    /// Service `agent`.
    pub agent: Vec<AgentEvents>,
    /// Service `memory`.
    pub memory: Vec<MemoryEvents>,
    /// Service `task`.
    pub task: Vec<TaskEvents>,
    /// Service `active-scheduler`.
    pub active_scheduler: Vec<ActiveSchedulerEvents>,
    /// Service `notification`.
    pub notification: Vec<NotificationEvents>,
    /// Service `token-store`.
    pub token_store: Vec<TokenStoreEvents>,
}
