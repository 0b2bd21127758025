//! sea-orm entities of the files database.

pub mod files {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "files")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub tenant_id: Uuid,
        pub workspace_id: Option<Uuid>,
        pub owner_id: String,
        pub display_name: String,
        pub content_type: String,
        pub size_bytes: i64,
        pub sha256: Vec<u8>,
        pub scan_status: String,
        pub scan_signature: String,
        pub scanner_version: String,
        pub scan_time: Option<TimeDateTimeWithTimeZone>,
        pub key_version: i32,
        pub wrapped_key: String,
        pub storage_key: String,
        pub committed: bool,
        pub created_at: TimeDateTimeWithTimeZone,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod rewrap_jobs {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "file_rewrap_jobs")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub tenant_id: Uuid,
        pub state: String,
        pub target_key_version: i32,
        pub total_files: i64,
        pub rewrapped_files: i64,
        pub failed_files: i64,
        pub started_at: TimeDateTimeWithTimeZone,
        pub ended_at: Option<TimeDateTimeWithTimeZone>,
        pub lease_until: TimeDateTimeWithTimeZone,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}
