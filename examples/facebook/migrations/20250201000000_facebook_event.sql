-- Facebook events: the same shape as the TTK collector's table, plus the
-- columns worth querying directly (extracted at insert time by the template).
CREATE TABLE IF NOT EXISTS "FacebookEvent" (
    "id" TEXT NOT NULL,
    "eventId" TEXT NOT NULL,
    "timestamp" TIMESTAMP(3) NOT NULL,
    "funnelStage" TEXT NOT NULL,
    "eventType" TEXT NOT NULL,
    "userId" TEXT NOT NULL,
    "country" TEXT NOT NULL,
    "purchaseAmount" NUMERIC(12, 2),
    "data" JSONB NOT NULL,
    "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    CONSTRAINT "FacebookEvent_pkey" PRIMARY KEY ("id")
);
CREATE UNIQUE INDEX IF NOT EXISTS "FacebookEvent_eventId_key" ON "FacebookEvent"("eventId");
CREATE INDEX IF NOT EXISTS "FacebookEvent_timestamp_idx" ON "FacebookEvent"("timestamp");
CREATE INDEX IF NOT EXISTS "FacebookEvent_eventType_idx" ON "FacebookEvent"("eventType");
