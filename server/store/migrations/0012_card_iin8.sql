-- 0012: the first eight digits of a card number of 16 digits or more (PCI DSS allows keeping the first
-- eight and last four of those; shorter numbers keep six). With 8-digit BIN ranges the card's network,
-- hence its decision hint, needs them: `bin` (six digits) may fall in a block the table splits.
-- NULL for cards of 15 digits or fewer, and for cards issued before this migration (their hint uses
-- the network of the range covering their whole six-digit block, none where the table splits it).
ALTER TABLE cards ADD COLUMN iin8 char(8);
