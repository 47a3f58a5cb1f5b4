// Groups and tags, loaded once after sign-in and shared by every page (names for ids).

import type { ComponentChildren } from 'preact';
import { createContext } from 'preact';
import { useCallback, useContext, useEffect, useMemo, useState } from 'preact/hooks';
import { get } from '../api';
import type { Group, Tag } from '../types';

export interface Catalog {
  groups: Group[];
  tags: Tag[];
  loaded: boolean;
  groupName: (id: number | null | undefined) => string;
  tagName: (id: number) => string;
  reload: () => Promise<void>;
}

const CatalogContext = createContext<Catalog>({
  groups: [],
  tags: [],
  loaded: false,
  groupName: () => '',
  tagName: (id) => `#${id}`,
  reload: async () => {},
});

export function useCatalog(): Catalog {
  return useContext(CatalogContext);
}

const byName = <T extends { name: string }>(a: T, b: T) => a.name.localeCompare(b.name);

export function CatalogProvider({ children }: { children: ComponentChildren }) {
  const [groups, setGroups] = useState<Group[]>([]);
  const [tags, setTags] = useState<Tag[]>([]);
  const [loaded, setLoaded] = useState(false);
  const reload = useCallback(async () => {
    try {
      const [g, t] = await Promise.all([get<Group[]>('/groups'), get<Tag[]>('/tags')]);
      setGroups([...(g ?? [])].sort(byName));
      setTags([...(t ?? [])].sort(byName));
    } catch {
      // Pages that need them show their own errors; names fall back to ids.
    } finally {
      setLoaded(true);
    }
  }, []);
  useEffect(() => {
    void reload();
  }, [reload]);
  const value = useMemo<Catalog>(() => {
    const g = new Map(groups.map((x) => [x.id, x.name]));
    const t = new Map(tags.map((x) => [x.id, x.name]));
    return {
      groups,
      tags,
      loaded,
      groupName: (id) => (id === null || id === undefined || id === 0 ? '' : g.get(id) ?? `group ${id}`),
      tagName: (id) => t.get(id) ?? `tag ${id}`,
      reload,
    };
  }, [groups, tags, loaded, reload]);
  return <CatalogContext.Provider value={value}>{children}</CatalogContext.Provider>;
}
