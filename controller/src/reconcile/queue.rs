//! Pending, once valid: may it start now? A snapshot of the Migrations for
//! [`crate::queue::admit`], taken under the queue's lock (held until this reconcile has
//! written its status, so the next look sees this one's phase).
use super::*;
use crate::queue::{Entry, Key, State, admit};

impl Reconciler<'_> {
    pub(super) async fn admit(&mut self, source_node: &str) -> Result<Result<(), String>, Error> {
        self.admission = Some(self.ctx.admission.clone().lock_owned().await);
        let api: Api<Migration> = match &self.ctx.watch_namespace {
            Some(ns) => Api::namespaced(self.ctx.client.clone(), ns),
            None => Api::all(self.ctx.client.clone()),
        };
        let me = self.m.uid();
        let others: Vec<Entry> = api
            .list(&ListParams::default())
            .await?
            .items
            .iter()
            .filter(|m| m.uid() != me)
            .map(|m| {
                let s = m.status.clone().unwrap_or_default();
                let state = match s.phase {
                    None | Some(Phase::Pending) if s.queued.is_some() => State::Queued,
                    None | Some(Phase::Pending) => State::Other,
                    Some(p) if p.is_terminal() => State::Other,
                    Some(_) => State::Active,
                };
                Entry {
                    key: key_of(m),
                    source_node: s.source.map(|p| p.node),
                    state,
                }
            })
            .collect();
        Ok(admit(
            &key_of(self.m),
            source_node,
            &others,
            self.ctx.limits,
        ))
    }
}

fn key_of(m: &Migration) -> Key {
    let drain = m.labels().contains_key(crate::drain::EVICTED_FROM_LABEL);
    let created = m
        .metadata
        .creation_timestamp
        .as_ref()
        .map(|t| t.0.as_millisecond())
        .unwrap_or(0);
    let id = format!("{}/{}", m.namespace().unwrap_or_default(), m.name_any());
    Key::new(drain, m.spec.priority, created, &id)
}
