-- The TTK collector's table, exactly as its Prisma migration created it.
-- IF NOT EXISTS makes this a no-op on a database the original service already
-- migrated, so ingestd can take it over with the data untouched.
CREATE TABLE IF NOT EXISTS "TiktokEvent" (
    "id" TEXT NOT NULL,
    "eventId" TEXT NOT NULL,
    "timestamp" TIMESTAMP(3) NOT NULL,
    "funnelStage" TEXT NOT NULL,
    "eventType" TEXT NOT NULL,
    "data" JSONB NOT NULL,
    "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    CONSTRAINT "TiktokEvent_pkey" PRIMARY KEY ("id")
);
CREATE UNIQUE INDEX IF NOT EXISTS "TiktokEvent_eventId_key" ON "TiktokEvent"("eventId");
CREATE INDEX IF NOT EXISTS "TiktokEvent_timestamp_idx" ON "TiktokEvent"("timestamp");
CREATE INDEX IF NOT EXISTS "TiktokEvent_eventType_idx" ON "TiktokEvent"("eventType");
