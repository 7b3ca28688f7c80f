DROP TABLE IF EXISTS scoring_state;
