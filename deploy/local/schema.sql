-- cellgate demo: the musician-marketplace schema of the `core` database.
--
-- Created on every shard's `core` database by `cellgate demo load` (src/demo.rs, which embeds
-- this file), connected as the app role that owns the database. Idempotent: safe to run again.
--
-- Every table has an `h3` column: the row's resolution-15 H3 cell, i.e. `point_cell(lat, lng)`,
-- the one derivation of a point's cell that the router, the loader, `cellgate locate` and the
-- migration filters share (design §2). The owning cell of a row is the parent at the map's
-- resolution R of this cell, so `h3` decides which shard a row lives on. It is stored as the
-- u64 H3 index reinterpreted as a signed BIGINT; H3 indexes fit in 63 bits (the top bit is
-- reserved and 0), so the stored value is always positive and sorts like the u64 index.
-- The descendants of any coarser cell form one contiguous range of res-15 indexes, so
-- "rows under cell C" (migrations, area reads) is a range scan on the h3 btree.
--
-- No foreign keys: a musician booked for a gig may live on another shard, and migrations move
-- rows table by table. A gig request is placed at its venue's point, so it shares the venue's
-- h3 and shard.

CREATE TABLE IF NOT EXISTS musicians (
    id                BIGINT PRIMARY KEY,
    name              TEXT NOT NULL,
    instrument        TEXT NOT NULL,
    genres            TEXT[] NOT NULL DEFAULT '{}',
    rating            NUMERIC(3, 2) CHECK (rating BETWEEN 0 AND 5),
    hourly_rate_cents INTEGER CHECK (hourly_rate_cents >= 0),
    city              TEXT,
    country           TEXT,
    lat               DOUBLE PRECISION NOT NULL CHECK (lat BETWEEN -90 AND 90),
    lng               DOUBLE PRECISION NOT NULL CHECK (lng BETWEEN -180 AND 180),
    h3                BIGINT NOT NULL, -- resolution-15 cell of (lat, lng), signed reinterpretation
    created_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    profile           JSONB NOT NULL DEFAULT '{}'
);

CREATE TABLE IF NOT EXISTS venues (
    id         BIGINT PRIMARY KEY,
    name       TEXT NOT NULL,
    kind       TEXT NOT NULL,            -- bar, club, theater, hall, ...
    capacity   INTEGER CHECK (capacity > 0),
    city       TEXT,
    country    TEXT,
    lat        DOUBLE PRECISION NOT NULL CHECK (lat BETWEEN -90 AND 90),
    lng        DOUBLE PRECISION NOT NULL CHECK (lng BETWEEN -180 AND 180),
    h3         BIGINT NOT NULL,          -- resolution-15 cell of (lat, lng), signed reinterpretation
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS gig_requests (
    id           BIGINT PRIMARY KEY,
    venue_id     BIGINT NOT NULL,        -- venues.id on the same shard (same point, same h3)
    musician_id  BIGINT,                 -- NULL while open; the musician may live on any shard
    title        TEXT NOT NULL,
    genre        TEXT,
    budget_cents INTEGER CHECK (budget_cents >= 0),
    gig_date     DATE NOT NULL,
    lat          DOUBLE PRECISION NOT NULL CHECK (lat BETWEEN -90 AND 90),
    lng          DOUBLE PRECISION NOT NULL CHECK (lng BETWEEN -180 AND 180),
    h3           BIGINT NOT NULL,        -- resolution-15 cell of (lat, lng), signed reinterpretation
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Cell filters (`WHERE h3 BETWEEN lo AND hi` for a coarser cell's descendants) and migrations.
CREATE INDEX IF NOT EXISTS musicians_h3_idx ON musicians (h3);
CREATE INDEX IF NOT EXISTS venues_h3_idx ON venues (h3);
CREATE INDEX IF NOT EXISTS gig_requests_h3_idx ON gig_requests (h3);

-- "Nearby" reads: a lat/lng bounding box (lat range first, then lng) before an exact distance.
CREATE INDEX IF NOT EXISTS musicians_lat_lng_idx ON musicians (lat, lng);
CREATE INDEX IF NOT EXISTS venues_lat_lng_idx ON venues (lat, lng);
CREATE INDEX IF NOT EXISTS gig_requests_lat_lng_idx ON gig_requests (lat, lng);

-- Common filters of the demo's queries.
CREATE INDEX IF NOT EXISTS musicians_genres_idx ON musicians USING gin (genres);
CREATE INDEX IF NOT EXISTS gig_requests_venue_idx ON gig_requests (venue_id);
CREATE INDEX IF NOT EXISTS gig_requests_date_idx ON gig_requests (gig_date);
