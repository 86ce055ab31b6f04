"""Operations: job submission, the job journal, nightly schedules."""
