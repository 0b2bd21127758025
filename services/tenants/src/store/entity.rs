//! sea-orm entities of the tenants database.

pub mod tenants {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "tenants")]
    pub struct Model {
        /// The tenant's own id, named `tenant_id` so the row level security policy every
        /// tenant table shares applies unchanged.
        #[sea_orm(primary_key, auto_increment = false)]
        pub tenant_id: Uuid,
        pub name: String,
        pub slug: String,
        pub plan: String,
        pub mfa_required: bool,
        pub session_lifetime_secs: i64,
        pub lockout_threshold: i32,
        pub lockout_window_secs: i64,
        pub lockout_duration_secs: i64,
        pub state: String,
        pub saga: String,
        pub platform: bool,
        pub request_id: Option<Uuid>,
        pub owner_id: Option<Uuid>,
        pub created_at: TimeDateTimeWithTimeZone,
        pub updated_at: TimeDateTimeWithTimeZone,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod users {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "tenant_users")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub tenant_id: Uuid,
        pub email: String,
        /// Lower-cased email, unique per tenant; NULL once deleted (NULLs never collide).
        pub email_key: Option<String>,
        pub display_name: String,
        pub status: String,
        pub suspend_reason: String,
        pub suspend_alert_id: Option<Uuid>,
        pub created_at: TimeDateTimeWithTimeZone,
        pub updated_at: TimeDateTimeWithTimeZone,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod workspaces {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "tenant_workspaces")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub tenant_id: Uuid,
        pub name: String,
        /// Lower-cased name, unique per tenant and the listing order.
        pub name_key: String,
        pub description: String,
        pub created_at: TimeDateTimeWithTimeZone,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}
